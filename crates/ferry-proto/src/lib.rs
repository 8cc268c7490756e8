//! ferry's wire format: messages, framing, versioning and limits. No I/O.
//!
//! Layer: the bottom of the stack; both the primary's sender and the
//! replica's receiver speak only the types defined here. Start reading at
//! [`Message`], then [`codec`] for how a frame is laid out and bounded.
//!
//! Every frame is `u32 length (big-endian) | u8 kind | payload`. The length is
//! checked against [`MAX_FRAME`] before a single byte is buffered, and every
//! variable-size field inside a payload is checked against its own limit
//! before anything is allocated: no size a peer sends can make us allocate
//! more than [`MAX_FRAME`].
#![forbid(unsafe_code)]

pub mod codec;
pub mod path;

pub use codec::{decode_frame, encode, encode_head, FrameDecoder, ProtoError};
pub use path::{check_link_target, link_stays_inside, mode_ok, PathError, RelPath, MODE_ALLOWED};

use bytes::Bytes;

/// Oldest wire version this build speaks. A node of release N speaks the
/// wire versions of releases N and N-1 (see `docs/UPGRADING.md`), so a
/// cluster can be upgraded while its peers still run the previous release.
pub const VERSION_MIN: u16 = 1;
/// Newest wire version this build speaks; bumped on any incompatible change
/// (and `VERSION_MIN` raised to the previous release's newest).
///
/// - 1: ferry 0.1 (one version per node; a hello of another version is
///   refused).
/// - 2: ferry 0.2: version ranges ([`Message::Versions`] after a hello of
///   version 2 or more, and the chosen version in the [`Welcome`]).
pub const VERSION_MAX: u16 = 2;
/// The wire versions this build speaks.
pub const VERSIONS: WireVersions = WireVersions {
    min: VERSION_MIN,
    max: VERSION_MAX,
};
/// The newest wire version this build speaks (what a hello carries).
pub const VERSION: u16 = VERSION_MAX;
/// ALPN identifier negotiated by TLS.
pub const ALPN: &[u8] = b"ferry/1";
/// Largest file-data payload in one frame.
pub const MAX_DATA: usize = 1 << 20;
/// Largest frame accepted (data plus headroom for headers).
pub const MAX_FRAME: usize = MAX_DATA + 64 * 1024;
/// Longest node name.
pub const MAX_NAME: usize = 253;
/// Longest free-text message in a [`Refuse`].
pub const MAX_TEXT: usize = 4096;
/// Largest file size a peer may announce (1 TiB).
pub const MAX_FILE_SIZE: u64 = 1 << 40;
/// Most ranges one [`PatchHeader`] may carry.
pub const MAX_PATCH_RANGES: usize = 4096;

/// Modification time: seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Mtime {
    pub secs: i64,
    pub nanos: u32,
}

/// What kind of entry a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

/// One entry of a node's manifest, as exchanged for an initial sync or resync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: RelPath,
    pub kind: EntryKind,
    /// Permission bits (0 for symlinks).
    pub mode: u32,
    pub size: u64,
    pub mtime: Mtime,
    /// Symlink target (empty for other kinds).
    pub target: Vec<u8>,
    /// BLAKE3 of a file's content, when the manifest was asked to verify.
    pub hash: Option<[u8; 32]>,
}

/// A range of wire versions, `min..=max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WireVersions {
    pub min: u16,
    pub max: u16,
}

impl WireVersions {
    /// The highest version both ranges hold, if any.
    pub fn common(self, other: WireVersions) -> Option<u16> {
        let v = self.max.min(other.max);
        (v >= self.min.max(other.min) && self.min <= self.max && other.min <= other.max)
            .then_some(v)
    }

    /// Whether `v` is in the range.
    pub fn contains(self, v: u16) -> bool {
        self.min <= v && v <= self.max
    }
}

impl std::fmt::Display for WireVersions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}..={}", self.min, self.max)
        }
    }
}

/// Primary → replica, first message on a connection.
///
/// Compatibility with wire version 1 (ferry 0.1), whose decoder refuses
/// trailing bytes and whose replica refuses any `version` but 1: the hello's
/// layout never changes. `version` is the newest version the primary speaks;
/// when it is 2 or more, a [`Message::Versions`] with the whole range follows
/// at once (a 0.1 replica refuses the hello with [`RefuseCode::Version`]
/// before reading it, and the primary falls back to a version-1 hello on a
/// new connection if its range holds 1). A version-1 hello is followed by
/// nothing: its sender speaks 1 only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub node: String,
    pub epoch: u64,
    /// The primary's last sealed batch.
    pub last_seq: u64,
}

/// Replica → primary, answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub node: String,
    /// Highest epoch the replica has seen.
    pub epoch: u64,
    /// Epoch of the last batch the replica applied.
    pub applied_epoch: u64,
    /// Last batch the replica applied (0: none).
    pub applied_seq: u64,
    /// Random per replica process: a primary tells a greeting from the
    /// process it already has a session with from one of a new process.
    pub instance: u64,
    /// The wire version the session runs at, chosen by the replica from the
    /// primary's [`Message::Versions`]. `None` (encoded as nothing, the
    /// version-1 layout) in answer to a version-1 hello.
    pub version: Option<u16>,
}

/// Why a peer refused or aborted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum RefuseCode {
    /// The sender's epoch is older than one the receiver has seen (G7).
    StaleEpoch = 1,
    /// The receiver is itself primary and takes no batches.
    NotReplica = 2,
    /// Protocol version mismatch.
    Version = 3,
    /// A message broke the protocol (order, size, hash, path rule).
    Protocol = 4,
    /// The replica could not apply a batch (disk full, I/O error).
    Apply = 5,
    /// The replica's content disagrees with the batch; a resync is needed.
    Inconsistent = 6,
    /// Anything else.
    Other = 7,
}

impl RefuseCode {
    fn from_u16(v: u16) -> RefuseCode {
        match v {
            1 => RefuseCode::StaleEpoch,
            2 => RefuseCode::NotReplica,
            3 => RefuseCode::Version,
            4 => RefuseCode::Protocol,
            5 => RefuseCode::Apply,
            6 => RefuseCode::Inconsistent,
            _ => RefuseCode::Other,
        }
    }
}

/// A refusal or an abort, with the receiver's epoch and a sentence saying why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refuse {
    pub code: RefuseCode,
    pub epoch: u64,
    pub message: String,
}

/// Header of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchHeader {
    pub epoch: u64,
    pub seq: u64,
    /// When the primary sealed the batch (Unix nanoseconds).
    pub sealed_at_ns: u64,
    /// No change arrived while the batch was read: a state the source had.
    pub exact: bool,
    /// A manifest-diff resync: after it the replica is at `seq`.
    pub resync: bool,
}

/// A metadata-only operation inside a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Ensure a directory exists with this mode (replacing a non-directory).
    Mkdir { path: RelPath, mode: u32 },
    /// Create or replace a symlink.
    Symlink {
        path: RelPath,
        target: Vec<u8>,
        mtime: Mtime,
    },
    /// Remove a file, link or whole tree; absent is fine.
    Delete { path: RelPath },
    /// Move an entry (file or directory) in one step.
    Rename { from: RelPath, to: RelPath },
    /// Change mode and mtime of an existing file.
    SetMeta {
        path: RelPath,
        mode: u32,
        mtime: Mtime,
    },
}

/// Announces the content of one regular file; [`Message::FileData`] frames
/// follow, then [`Message::FileEnd`] or [`Message::FileAbort`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHeader {
    pub path: RelPath,
    pub mode: u32,
    pub mtime: Mtime,
    pub size: u64,
}

/// Extends a file the replica already holds in place: the bytes from
/// `offset` to `size` follow as [`Message::FileData`], then
/// [`Message::FileEnd`] (hash of the appended bytes) or
/// [`Message::FileAbort`] (the replica truncates back to `offset`). The
/// replica's file must be exactly `offset` bytes with mtime `prev_mtime`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendHeader {
    pub path: RelPath,
    pub offset: u64,
    pub prev_mtime: Mtime,
    pub size: u64,
    pub mode: u32,
    pub mtime: Mtime,
}

/// Rewrites parts of a file the replica already holds, in place: the
/// replica's file must be exactly `prev_size` bytes with mtime `prev_mtime`
/// (the version the primary diffed against). The new bytes of every range,
/// in order and back to back, follow as [`Message::FileData`],
/// [`Message::FileDataZ`] or [`Message::FileCopy`], then
/// [`Message::FileEnd`] (BLAKE3 of those bytes) or [`Message::FileAbort`].
/// At apply the ranges are written, the file is cut or extended to `size`,
/// and mode and mtime are set. Ranges are sorted, disjoint, and end within
/// `size`; a range past `prev_size` extends the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchHeader {
    pub path: RelPath,
    pub prev_size: u64,
    pub prev_mtime: Mtime,
    pub size: u64,
    pub mode: u32,
    pub mtime: Mtime,
    /// (offset, length) of each rewritten range.
    pub ranges: Vec<(u64, u64)>,
}

impl PatchHeader {
    /// Bytes the ranges rewrite in all.
    pub fn patched(&self) -> u64 {
        self.ranges.iter().map(|r| r.1).sum()
    }
}

/// Every message of protocol version 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    /// Since wire version 2. Primary → replica right after a [`Hello`] whose
    /// version is 2 or more: every version the primary speaks. Replica →
    /// primary right before a [`RefuseCode::Version`] refusal of such a
    /// hello: every version the replica speaks (so the primary can say which
    /// side to upgrade).
    Versions(WireVersions),
    Welcome(Welcome),
    Refuse(Refuse),
    /// Primary asks the replica for its manifest; with `verify`, files carry
    /// content hashes (for content of unknown provenance, where size and
    /// mtime can match by accident).
    ManifestRequest {
        verify: bool,
        /// Only this subtree (after a directory move), or the whole root.
        prefix: Option<RelPath>,
    },
    ManifestEntry(Entry),
    ManifestEnd {
        count: u64,
    },
    BatchBegin(BatchHeader),
    Op(Op),
    FileBegin(FileHeader),
    FileAppend(AppendHeader),
    FileData(Bytes),
    /// File data compressed with zstd (one frame); `raw_len` (at most
    /// [`MAX_DATA`]) is its size once decompressed: the receiver decompresses
    /// into exactly that much and refuses anything else (no bombs).
    FileDataZ {
        raw_len: u32,
        data: Bytes,
    },
    /// The next `len` bytes of the file being received are the bytes at
    /// `offset` of the replica's own file `src`, as it holds it at the start
    /// of this batch (a chunk it already has: of the old version of the same
    /// file, or of another file). Checked by the file's hash at the end.
    FileCopy {
        src: RelPath,
        offset: u64,
        len: u64,
    },
    /// Starts an in-place patch of a file the replica holds.
    FilePatch(PatchHeader),
    /// End of a file; BLAKE3 of its content.
    FileEnd {
        hash: [u8; 32],
    },
    /// The file changed while it was read: drop what was received of it.
    FileAbort,
    BatchEnd {
        seq: u64,
    },
    /// Replica → primary: batch `seq` of `epoch` is on stable storage.
    Ack {
        epoch: u64,
        seq: u64,
    },
    /// Primary → replica, outside a batch (planned switchover): become the
    /// primary of `epoch` (the sender's + 1), continuing after batch `seq`,
    /// which the replica must have applied. Answered with `Ack { epoch, seq }`.
    Promote {
        epoch: u64,
        seq: u64,
    },
    /// Primary → replica, after the welcome: the primary's epoch began after
    /// batch `base_seq` of `base_epoch`, sealed at `base_sealed_at_ns`. A
    /// demoted primary uses it to tell its own unreplicated writes apart.
    EpochBase {
        epoch: u64,
        base_epoch: u64,
        base_seq: u64,
        base_sealed_at_ns: u64,
    },
}
