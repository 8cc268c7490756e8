//! The replica's redo journal (G2, G4).
//!
//! A batch is received into staged files (in the root's staging dir) and a
//! journal of its steps (in the state dir). Before any step touches the
//! tree, the staged files are fsynced and the journal gets a trailer with a
//! BLAKE3 hash of everything before it, then is fdatasynced: from then on
//! the batch is *committed* and a crash at any later point is finished on
//! restart ([`crate::Applier::recover`]).
//!
//! File layout:
//!
//! ```text
//! header   "FERRYJ01" | nonce u64 | base_epoch u64 | base_seq u64
//!          | epoch u64 | seq u64 | sealed_at_ns u64 | resync u8 | boot_id [16]
//! steps    ferry-proto frames: Op, FileBegin (a staged whole file),
//!          FileAppend (a staged tail)          — the n-th file step's
//!          content is the staged file named n
//! trailer  "FJCOMMIT" | body_len u64 | blake3(header and steps) [32]
//! ```
//!
//! Progress is a separate 16-byte record (`journal.progress`: nonce, steps
//! done), overwritten in place after each step without an fsync: after a
//! process crash the kernel still holds it. After a machine crash (the boot
//! id differs) it may be stale, so the redo runs every remaining step in its
//! tolerant form and the replica asks for a resync (see `recover`).

use bytes::BytesMut;
use ferry_proto::{FrameDecoder, Message};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"FERRYJ01";
const TRAILER: &[u8; 8] = b"FJCOMMIT";
const HEADER_LEN: usize = 8 + 8 * 6 + 1 + 16;
const TRAILER_LEN: usize = 8 + 8 + 32;

/// `done` value: the batch was applied and its state saved.
pub const FINISHED: u64 = u64::MAX;
/// `done` value: applying hit an inconsistency; the tree is mid-batch and
/// only a resync brings it back to a boundary.
pub const ABANDONED: u64 = u64::MAX - 1;

/// What a batch is, and where the replica stood when it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchInfo {
    pub epoch: u64,
    pub seq: u64,
    pub sealed_at_ns: u64,
    pub resync: bool,
    /// The replica's applied (epoch, seq) when the batch arrived.
    pub base_epoch: u64,
    pub base_seq: u64,
}

/// A committed journal read back.
#[derive(Debug, Clone, Copy)]
pub struct Committed {
    pub nonce: u64,
    pub info: BatchInfo,
    pub boot_id: [u8; 16],
    body_len: u64,
}

pub struct Journal {
    path: PathBuf,
    file: File,
    progress: File,
    /// The batch being written: its nonce and running hash.
    writing: Option<(u64, blake3::Hasher, u64, BatchInfo)>,
    out: Vec<u8>,
}

/// This boot's id (Linux); all zeros where unknown.
pub fn boot_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        let hex: Vec<u8> = s.bytes().filter(|b| b.is_ascii_hexdigit()).collect();
        for (i, pair) in hex.chunks(2).take(16).enumerate() {
            let t = std::str::from_utf8(pair).unwrap_or("0");
            id[i] = u8::from_str_radix(t, 16).unwrap_or(0);
        }
    }
    id
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl Journal {
    /// Opens (creating) `dir/journal` and `dir/journal.progress`.
    pub fn open(dir: &Path) -> io::Result<Journal> {
        let path = dir.join("journal");
        let fresh = !path.exists();
        let mut oo = OpenOptions::new();
        oo.read(true).write(true).create(true).truncate(false);
        let file = oo.open(&path)?;
        let progress = oo.open(dir.join("journal.progress"))?;
        if fresh {
            File::open(dir)?.sync_all()?;
        }
        Ok(Journal {
            path,
            file,
            progress,
            writing: None,
            out: Vec::with_capacity(64 << 10),
        })
    }

    /// Starts the journal of a new batch (the previous one is discarded).
    pub fn start(&mut self, info: &BatchInfo) -> io::Result<u64> {
        let nonce = fastrand::u64(1..ABANDONED);
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        let mut h = Vec::with_capacity(HEADER_LEN);
        h.extend_from_slice(MAGIC);
        for v in [
            nonce,
            info.base_epoch,
            info.base_seq,
            info.epoch,
            info.seq,
            info.sealed_at_ns,
        ] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        h.push(info.resync as u8);
        h.extend_from_slice(&boot_id());
        let mut hasher = blake3::Hasher::new();
        hasher.update(&h);
        self.out.clear();
        self.out.extend_from_slice(&h);
        self.writing = Some((nonce, hasher, h.len() as u64, *info));
        Ok(nonce)
    }

    /// Appends one step (buffered; durable only at [`Journal::commit`]).
    pub fn push(&mut self, msg: &Message) -> io::Result<()> {
        let Some((_, hasher, len, _)) = self.writing.as_mut() else {
            return Err(io::Error::other("journal step outside a batch"));
        };
        let mut b = BytesMut::new();
        ferry_proto::codec::encode(msg, &mut b);
        hasher.update(&b);
        *len += b.len() as u64;
        self.out.extend_from_slice(&b);
        if self.out.len() >= 64 << 10 {
            self.file.write_all(&self.out)?;
            self.out.clear();
        }
        Ok(())
    }

    /// Writes the trailer and makes the journal durable: the batch is
    /// committed when this returns.
    pub fn commit(&mut self, crash: impl Fn(&'static str)) -> io::Result<Committed> {
        let Some((nonce, hasher, len, info)) = self.writing.take() else {
            return Err(io::Error::other("journal commit outside a batch"));
        };
        let mut t = Vec::with_capacity(TRAILER_LEN);
        t.extend_from_slice(TRAILER);
        t.extend_from_slice(&len.to_le_bytes());
        t.extend_from_slice(hasher.finalize().as_bytes());
        self.out.extend_from_slice(&t[..TRAILER_LEN / 2]);
        self.file.write_all(&self.out)?;
        self.out.clear();
        crash("journal-torn-trailer");
        self.file.write_all(&t[TRAILER_LEN / 2..])?;
        self.file.sync_data()?;
        Ok(Committed {
            nonce,
            info,
            boot_id: boot_id(),
            body_len: len,
        })
    }

    /// Drops a batch being written.
    pub fn abandon_writing(&mut self) {
        self.writing = None;
        self.out.clear();
    }

    pub fn set_progress(&self, nonce: u64, done: u64) -> io::Result<()> {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&nonce.to_le_bytes());
        b[8..].copy_from_slice(&done.to_le_bytes());
        self.progress.write_all_at(&b, 0)
    }

    /// (nonce, steps done); (0, 0) when never written.
    pub fn progress(&self) -> io::Result<(u64, u64)> {
        let mut b = [0u8; 16];
        match self.progress.read_exact_at(&mut b, 0) {
            Ok(()) => Ok((u64_at(&b, 0), u64_at(&b, 8))),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok((0, 0)),
            Err(e) => Err(e),
        }
    }

    /// The committed batch in the journal, if there is one whose hash
    /// checks. A torn or half-written journal reads as `None`.
    pub fn committed(&self) -> io::Result<Option<Committed>> {
        let len = self.file.metadata()?.len();
        if len < (HEADER_LEN + TRAILER_LEN) as u64 {
            return Ok(None);
        }
        let mut t = [0u8; TRAILER_LEN];
        self.file.read_exact_at(&mut t, len - TRAILER_LEN as u64)?;
        if &t[..8] != TRAILER || u64_at(&t, 8) != len - TRAILER_LEN as u64 {
            return Ok(None);
        }
        let body_len = u64_at(&t, 8);
        let mut hasher = blake3::Hasher::new();
        let mut r = io::BufReader::with_capacity(256 << 10, (&self.file).take(body_len));
        (&self.file).seek(SeekFrom::Start(0))?;
        io::copy(&mut r, &mut hasher)?;
        if hasher.finalize().as_bytes()[..] != t[16..] {
            return Ok(None);
        }
        let mut h = [0u8; HEADER_LEN];
        self.file.read_exact_at(&mut h, 0)?;
        if &h[..8] != MAGIC {
            return Ok(None);
        }
        let mut boot = [0u8; 16];
        boot.copy_from_slice(&h[HEADER_LEN - 16..]);
        Ok(Some(Committed {
            nonce: u64_at(&h, 8),
            info: BatchInfo {
                base_epoch: u64_at(&h, 16),
                base_seq: u64_at(&h, 24),
                epoch: u64_at(&h, 32),
                seq: u64_at(&h, 40),
                sealed_at_ns: u64_at(&h, 48),
                resync: h[56] != 0,
            },
            boot_id: boot,
            body_len,
        }))
    }

    /// Reads the steps of a committed journal back, in order.
    pub fn steps(&self, c: &Committed) -> io::Result<Steps> {
        let f = File::open(&self.path)?;
        let mut r = io::BufReader::with_capacity(256 << 10, f);
        r.seek(SeekFrom::Start(HEADER_LEN as u64))?;
        Ok(Steps {
            r: r.take(c.body_len - HEADER_LEN as u64),
            dec: FrameDecoder::new(),
            buf: vec![0; 64 << 10],
        })
    }
}

/// An iterator over journal steps.
pub struct Steps {
    r: io::Take<io::BufReader<File>>,
    dec: FrameDecoder,
    buf: Vec<u8>,
}

impl Steps {
    pub fn next_step(&mut self) -> io::Result<Option<Message>> {
        loop {
            match self.dec.next() {
                Ok(Some(m)) => return Ok(Some(m)),
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
            }
            let n = self.r.read(&mut self.buf)?;
            if n == 0 {
                return if self.dec.buffered() == 0 {
                    Ok(None)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "journal ends inside a step",
                    ))
                };
            }
            self.dec.extend(&self.buf[..n]);
        }
    }
}
