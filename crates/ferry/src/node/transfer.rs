//! Reading a file for a peer: content-defined chunks, the delta against the
//! version a peer holds, and compression. The blocking half of the sender:
//! these run on threads of their own while the async half ships frames, so
//! reading, hashing and compressing overlap with sending (two cores).

use bytes::{Bytes, BytesMut};
use ferry_core::chunk::{self, Chunk, Delta, Need, Piece, MAX_CHUNK};
use ferry_proto::Message;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use tokio::sync::mpsc;

/// Per-file compression state. Each data frame is compressed with zstd
/// (level 1: several hundred MB/s per core) and sent compressed when that
/// saves at least 1/16 of it; a frame that does not compress turns
/// compression off for the next [`COMPRESS_SKIP`] frames of the file, so
/// incompressible data (media, archives, encrypted files) costs one trial
/// per 16 frames.
#[derive(Default)]
pub(crate) struct Squeeze {
    skip: u32,
    pub(crate) saved: u64,
    /// A zstd context, made at the first trial and reused (making one per
    /// frame costs more than compressing a small file).
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

const COMPRESS_SKIP: u32 = 16;
const ZSTD_LEVEL: i32 = 1;

fn compress(z: &mut Squeeze, data: &[u8]) -> std::io::Result<Vec<u8>> {
    if z.zstd.is_none() {
        z.zstd = Some(zstd::bulk::Compressor::new(ZSTD_LEVEL)?);
    }
    z.zstd.as_mut().expect("just set").compress(data)
}

/// The message for one data frame, and its payload size on the wire.
pub(crate) fn squeeze(z: &mut Squeeze, buf: Bytes) -> (Message, u64) {
    if z.skip > 0 {
        z.skip -= 1;
    } else if buf.len() >= 512 {
        match compress(z, &buf) {
            Ok(c) if c.len() + c.len() / 16 < buf.len() => {
                z.saved += (buf.len() - c.len()) as u64;
                let n = c.len() as u64;
                return (
                    Message::FileDataZ {
                        raw_len: buf.len() as u32,
                        data: bytes::Bytes::from(c),
                    },
                    n,
                );
            }
            _ => z.skip = COMPRESS_SKIP,
        }
    }
    let n = buf.len() as u64;
    (Message::FileData(buf), n)
}

/// What the reader thread hands the sender.
pub(crate) enum Feed {
    /// The next chunk, and the frame that carries its bytes.
    Chunk {
        chunk: Chunk,
        msg: Message,
    },
    /// The file ended before its size: it changed while read.
    Short,
    /// All read: the whole-file hash, the chunk list, what compression saved.
    Done {
        full: [u8; 32],
        chunks: Vec<Chunk>,
        saved: u64,
    },
    Failed(std::io::Error),
}

/// Frames queued between the reader thread and the sender (at most
/// `READ_AHEAD` chunks of up to [`MAX_CHUNK`] bytes: bounded memory).
pub(crate) const READ_AHEAD: usize = 16;

/// Reads `f` from offset 0 to `size`: cuts it into chunks, hashes each and
/// the whole, compresses each, and queues them to `tx`. Runs on a blocking
/// thread; stops early if the receiver goes away.
pub(crate) fn produce(mut f: File, size: u64, tx: mpsc::Sender<Feed>) {
    let step = 1usize << 20;
    // the uncut end of the last read, carried into the next buffer
    let mut rest = Bytes::new();
    let mut full = blake3::Hasher::new();
    let mut chunks = Vec::new();
    let mut z = Squeeze::default();
    let mut read = 0u64;
    let mut lens = Vec::new();
    loop {
        let want = step.min((size - read) as usize);
        let mut buf = BytesMut::with_capacity(rest.len() + want);
        buf.extend_from_slice(&rest);
        let at = buf.len();
        buf.resize(at + want, 0);
        let n = match read_full(&mut f, &mut buf[at..]) {
            Ok(n) => n,
            Err(e) => {
                let _ = tx.blocking_send(Feed::Failed(e));
                return;
            }
        };
        buf.truncate(at + n);
        read += n as u64;
        if n < want {
            let _ = tx.blocking_send(Feed::Short);
            return;
        }
        // chunks are slices of one buffer: no copy on the way to the wire
        let buf = buf.freeze();
        let eof = read == size;
        lens.clear();
        let used = chunk::cuts(&buf, eof, &mut lens);
        let mut at = 0usize;
        for &n in &lens {
            let data = buf.slice(at..at + n);
            let c = Chunk::of(&data);
            full.update(&data);
            let (msg, _) = squeeze(&mut z, data);
            chunks.push(c);
            if tx.blocking_send(Feed::Chunk { chunk: c, msg }).is_err() {
                return;
            }
            at += n;
        }
        rest = buf.slice(used..);
        if eof && rest.is_empty() {
            break;
        }
    }
    let _ = tx.blocking_send(Feed::Done {
        full: *full.finalize().as_bytes(),
        chunks,
        saved: z.saved,
    });
}

pub(crate) fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// For each old chunk: does the same range of `f` (now `size` bytes) still
/// hash the same? Two threads, each over half the file.
fn same_ranges(f: &File, old: &[Chunk], size: u64) -> std::io::Result<Vec<bool>> {
    let offs = chunk::offsets(old);
    let mut same = vec![false; old.len()];
    let mid = old.len() / 2;
    let (a, b) = same.split_at_mut(mid);
    let fill = |chunks: &[Chunk], offs: &[u64], out: &mut [bool]| -> std::io::Result<()> {
        let mut buf = vec![0u8; MAX_CHUNK];
        for ((c, &off), o) in chunks.iter().zip(offs).zip(out.iter_mut()) {
            let n = c.len as usize;
            if off + n as u64 > size {
                break;
            }
            match f.read_exact_at(&mut buf[..n], off) {
                Ok(()) => *o = Chunk::of(&buf[..n]) == *c,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    };
    std::thread::scope(|sc| {
        let h = sc.spawn(|| fill(&old[mid..], &offs[mid..], b));
        let r = fill(&old[..mid], &offs[..mid], a);
        let r2 = h
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("hash thread panicked")));
        r.and(r2)
    })?;
    Ok(same)
}

/// The new version of a file against the chunks of the version a peer
/// holds: the new chunk list, and whether the change is a pure append
/// (every old byte unchanged, the file grew or stayed).
pub(crate) struct Diffed {
    pub pieces: Vec<Piece>,
    pub append: bool,
}

/// Re-chunks `f` (`size` bytes) against `old`, reading only around what
/// changed (see [`ferry_core::chunk::Delta`]).
pub(crate) fn diff(f: &File, old: &[Chunk], old_size: u64, size: u64) -> std::io::Result<Diffed> {
    let same = same_ranges(f, old, size)?;
    let append = size >= old_size && same.iter().all(|s| *s);
    let mut d = Delta::new(old, same, size);
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        match d.want() {
            Need::Done => break,
            Need::Bytes { offset, len } => {
                f.read_exact_at(&mut buf[..len], offset)?;
                d.feed(&buf[..len]);
            }
        }
    }
    Ok(Diffed {
        pieces: d.finish(),
        append,
    })
}

/// Merges the pieces that are not in place into sorted, disjoint ranges.
pub(crate) fn fresh_ranges(pieces: &[Piece]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for p in pieces.iter().filter(|p| !p.in_place) {
        let len = u64::from(p.chunk.len);
        match out.last_mut() {
            Some((o, l)) if *o + *l == p.offset => *l += len,
            _ => out.push((p.offset, len)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rnd(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn the_reader_thread_gives_the_chunks_of_the_whole_file() {
        let data = rnd(3 << 20, 7);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, &data).unwrap();
        let (tx, mut rx) = mpsc::channel(READ_AHEAD);
        let f = File::open(&p).unwrap();
        let size = data.len() as u64;
        let t = std::thread::spawn(move || produce(f, size, tx));
        let mut got = Vec::new();
        while let Some(feed) = rx.blocking_recv() {
            match feed {
                Feed::Chunk { chunk, .. } => got.push(chunk),
                Feed::Done { full, chunks, .. } => {
                    assert_eq!(full, *blake3::hash(&data).as_bytes());
                    assert_eq!(chunks, got);
                }
                Feed::Short | Feed::Failed(_) => panic!("short read"),
            }
        }
        t.join().unwrap();
        assert_eq!(got, chunk::chunk_all(&data));
    }

    #[test]
    fn a_one_mib_edit_of_a_large_file_reads_and_ships_about_one_mib() {
        let old = rnd(64 << 20, 9);
        let mut new = old.clone();
        new[30 << 20..31 << 20].copy_from_slice(&rnd(1 << 20, 10));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, &new).unwrap();
        let oc = chunk::chunk_all(&old);
        let d = diff(
            &File::open(&p).unwrap(),
            &oc,
            old.len() as u64,
            new.len() as u64,
        )
        .unwrap();
        assert!(!d.append);
        let got: Vec<Chunk> = d.pieces.iter().map(|p| p.chunk).collect();
        assert_eq!(got, chunk::chunk_all(&new));
        let ranges = fresh_ranges(&d.pieces);
        let fresh: u64 = ranges.iter().map(|r| r.1).sum();
        assert!(ranges.len() <= 2, "{ranges:?}");
        assert!(fresh < (1 << 20) + 2 * MAX_CHUNK as u64, "{fresh}");
    }
}
