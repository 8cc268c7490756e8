//! Framing and (de)serialisation of [`Message`]s with bounds checked first.

use crate::path::{PathError, RelPath, MAX_LINK_LEN, MAX_PATH_LEN};
use crate::*;
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Why bytes from a peer could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    FrameTooLarge(usize),
    #[error("frame is empty (no message kind)")]
    EmptyFrame,
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("message is truncated: {0} needs more bytes than the frame holds")]
    Truncated(&'static str),
    #[error("message has {0} trailing bytes")]
    Trailing(usize),
    #[error("field {field} is {len} bytes, over its {max}-byte limit")]
    FieldTooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("field {0} is not valid UTF-8")]
    NotUtf8(&'static str),
    #[error("invalid value {value} for {field}")]
    BadValue { field: &'static str, value: u64 },
    #[error("bad path: {0}")]
    BadPath(#[from] PathError),
}

mod kind {
    pub const HELLO: u8 = 1;
    pub const WELCOME: u8 = 2;
    pub const REFUSE: u8 = 3;
    pub const MANIFEST_REQUEST: u8 = 4;
    pub const MANIFEST_ENTRY: u8 = 5;
    pub const MANIFEST_END: u8 = 6;
    pub const BATCH_BEGIN: u8 = 7;
    pub const OP_MKDIR: u8 = 8;
    pub const OP_SYMLINK: u8 = 9;
    pub const OP_DELETE: u8 = 10;
    pub const OP_RENAME: u8 = 11;
    pub const OP_SETMETA: u8 = 12;
    pub const FILE_BEGIN: u8 = 13;
    pub const FILE_DATA: u8 = 14;
    pub const FILE_END: u8 = 15;
    pub const FILE_ABORT: u8 = 16;
    pub const BATCH_END: u8 = 17;
    pub const ACK: u8 = 18;
    pub const FILE_APPEND: u8 = 19;
    pub const PROMOTE: u8 = 20;
    pub const EPOCH_BASE: u8 = 21;
    pub const FILE_DATA_Z: u8 = 22;
    pub const FILE_COPY: u8 = 23;
    pub const FILE_PATCH: u8 = 24;
    pub const VERSIONS: u8 = 25;
}

/// For a file-data message with a large payload: appends the frame's head
/// (length, kind and fixed fields) to `out` and returns the payload, to be
/// sent right after it without copying. Other messages: `None`, nothing
/// written (use [`encode`]).
pub fn encode_head(msg: &Message, out: &mut BytesMut) -> Option<Bytes> {
    const MIN: usize = 16 << 10;
    match msg {
        Message::FileData(d) if d.len() >= MIN => {
            out.put_u32((1 + d.len()) as u32);
            out.put_u8(kind::FILE_DATA);
            Some(d.clone())
        }
        Message::FileDataZ { raw_len, data } if data.len() >= MIN => {
            out.put_u32((1 + 4 + data.len()) as u32);
            out.put_u8(kind::FILE_DATA_Z);
            out.put_u32(*raw_len);
            Some(data.clone())
        }
        _ => None,
    }
}

/// Appends one framed message to `out`.
pub fn encode(msg: &Message, out: &mut BytesMut) {
    let start = out.len();
    out.put_u32(0); // length, patched below
    match msg {
        Message::Hello(h) => {
            out.put_u8(kind::HELLO);
            out.put_u16(h.version);
            put_str(out, &h.node);
            out.put_u64(h.epoch);
            out.put_u64(h.last_seq);
        }
        Message::Welcome(w) => {
            out.put_u8(kind::WELCOME);
            put_str(out, &w.node);
            out.put_u64(w.epoch);
            out.put_u64(w.applied_epoch);
            out.put_u64(w.applied_seq);
            out.put_u64(w.instance);
            // version 1's layout ends here: a 0.1 primary refuses trailing
            // bytes, and is only ever answered without a version
            if let Some(v) = w.version {
                out.put_u16(v);
            }
        }
        Message::Versions(v) => {
            out.put_u8(kind::VERSIONS);
            out.put_u16(v.min);
            out.put_u16(v.max);
        }
        Message::Refuse(r) => {
            out.put_u8(kind::REFUSE);
            out.put_u16(r.code as u16);
            out.put_u64(r.epoch);
            let msg = truncate_utf8(&r.message, MAX_TEXT);
            put_str(out, msg);
        }
        Message::ManifestRequest { verify, prefix } => {
            out.put_u8(kind::MANIFEST_REQUEST);
            out.put_u8(u8::from(*verify));
            match prefix {
                None => out.put_u16(0),
                Some(p) => put_path(out, p),
            }
        }
        Message::ManifestEntry(e) => {
            out.put_u8(kind::MANIFEST_ENTRY);
            put_path(out, &e.path);
            out.put_u8(match e.kind {
                EntryKind::File => 0,
                EntryKind::Dir => 1,
                EntryKind::Symlink => 2,
            });
            out.put_u32(e.mode);
            out.put_u64(e.size);
            put_mtime(out, e.mtime);
            put_bytes16(out, &e.target);
            match &e.hash {
                None => out.put_u8(0),
                Some(h) => {
                    out.put_u8(1);
                    out.put_slice(h);
                }
            }
        }
        Message::ManifestEnd { count } => {
            out.put_u8(kind::MANIFEST_END);
            out.put_u64(*count);
        }
        Message::BatchBegin(b) => {
            out.put_u8(kind::BATCH_BEGIN);
            out.put_u64(b.epoch);
            out.put_u64(b.seq);
            out.put_u64(b.sealed_at_ns);
            out.put_u8(u8::from(b.exact) | (u8::from(b.resync) << 1));
        }
        Message::Op(op) => match op {
            Op::Mkdir { path, mode } => {
                out.put_u8(kind::OP_MKDIR);
                put_path(out, path);
                out.put_u32(*mode);
            }
            Op::Symlink {
                path,
                target,
                mtime,
            } => {
                out.put_u8(kind::OP_SYMLINK);
                put_path(out, path);
                put_bytes16(out, target);
                put_mtime(out, *mtime);
            }
            Op::Delete { path } => {
                out.put_u8(kind::OP_DELETE);
                put_path(out, path);
            }
            Op::Rename { from, to } => {
                out.put_u8(kind::OP_RENAME);
                put_path(out, from);
                put_path(out, to);
            }
            Op::SetMeta { path, mode, mtime } => {
                out.put_u8(kind::OP_SETMETA);
                put_path(out, path);
                out.put_u32(*mode);
                put_mtime(out, *mtime);
            }
        },
        Message::FileBegin(f) => {
            out.put_u8(kind::FILE_BEGIN);
            put_path(out, &f.path);
            out.put_u32(f.mode);
            put_mtime(out, f.mtime);
            out.put_u64(f.size);
        }
        Message::FileAppend(a) => {
            out.put_u8(kind::FILE_APPEND);
            put_path(out, &a.path);
            out.put_u64(a.offset);
            put_mtime(out, a.prev_mtime);
            out.put_u64(a.size);
            out.put_u32(a.mode);
            put_mtime(out, a.mtime);
        }
        Message::FileData(d) => {
            out.put_u8(kind::FILE_DATA);
            out.put_slice(d);
        }
        Message::FileDataZ { raw_len, data } => {
            out.put_u8(kind::FILE_DATA_Z);
            out.put_u32(*raw_len);
            out.put_slice(data);
        }
        Message::FileCopy { src, offset, len } => {
            out.put_u8(kind::FILE_COPY);
            put_path(out, src);
            out.put_u64(*offset);
            out.put_u64(*len);
        }
        Message::FilePatch(p) => {
            out.put_u8(kind::FILE_PATCH);
            put_path(out, &p.path);
            out.put_u64(p.prev_size);
            put_mtime(out, p.prev_mtime);
            out.put_u64(p.size);
            out.put_u32(p.mode);
            put_mtime(out, p.mtime);
            out.put_u32(p.ranges.len() as u32);
            for (o, n) in &p.ranges {
                out.put_u64(*o);
                out.put_u64(*n);
            }
        }
        Message::FileEnd { hash } => {
            out.put_u8(kind::FILE_END);
            out.put_slice(hash);
        }
        Message::FileAbort => out.put_u8(kind::FILE_ABORT),
        Message::BatchEnd { seq } => {
            out.put_u8(kind::BATCH_END);
            out.put_u64(*seq);
        }
        Message::Ack { epoch, seq } => {
            out.put_u8(kind::ACK);
            out.put_u64(*epoch);
            out.put_u64(*seq);
        }
        Message::Promote { epoch, seq } => {
            out.put_u8(kind::PROMOTE);
            out.put_u64(*epoch);
            out.put_u64(*seq);
        }
        Message::EpochBase {
            epoch,
            base_epoch,
            base_seq,
            base_sealed_at_ns,
        } => {
            out.put_u8(kind::EPOCH_BASE);
            out.put_u64(*epoch);
            out.put_u64(*base_epoch);
            out.put_u64(*base_seq);
            out.put_u64(*base_sealed_at_ns);
        }
    }
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_str(out: &mut BytesMut, s: &str) {
    put_bytes16(out, s.as_bytes());
}
fn put_bytes16(out: &mut BytesMut, b: &[u8]) {
    out.put_u16(b.len() as u16);
    out.put_slice(b);
}
fn put_path(out: &mut BytesMut, p: &RelPath) {
    put_bytes16(out, p.as_bytes());
}
fn put_mtime(out: &mut BytesMut, m: Mtime) {
    out.put_i64(m.secs);
    out.put_u32(m.nanos);
}

/// Incremental decoder: feed bytes with [`FrameDecoder::extend`], pull
/// messages with [`FrameDecoder::next`]. Never buffers more than one frame
/// beyond what was already fed, and refuses a frame length over the limit
/// before waiting for its bytes.
#[derive(Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds received bytes.
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }
    /// Bytes buffered and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
    /// The next whole message, `Ok(None)` when more bytes are needed.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Message>, ProtoError> {
        decode_frame(&mut self.buf)
    }
    /// How many more bytes are needed for the frame in progress (at least 1).
    pub fn wanted(&self) -> Result<usize, ProtoError> {
        if self.buf.len() < 4 {
            return Ok(4 - self.buf.len());
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_FRAME {
            return Err(ProtoError::FrameTooLarge(len));
        }
        Ok((4 + len).saturating_sub(self.buf.len()).max(1))
    }
}

/// Decodes one frame from the front of `buf`, consuming it.
pub fn decode_frame(buf: &mut BytesMut) -> Result<Option<Message>, ProtoError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME {
        return Err(ProtoError::FrameTooLarge(len));
    }
    if len == 0 {
        return Err(ProtoError::EmptyFrame);
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    buf.advance(4);
    let frame = buf.split_to(len).freeze();
    decode_message(frame).map(Some)
}

struct Rd {
    b: Bytes,
}

impl Rd {
    fn need(&self, n: usize, what: &'static str) -> Result<(), ProtoError> {
        if self.b.remaining() < n {
            Err(ProtoError::Truncated(what))
        } else {
            Ok(())
        }
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, ProtoError> {
        self.need(1, what)?;
        Ok(self.b.get_u8())
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, ProtoError> {
        self.need(2, what)?;
        Ok(self.b.get_u16())
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, ProtoError> {
        self.need(4, what)?;
        Ok(self.b.get_u32())
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, ProtoError> {
        self.need(8, what)?;
        Ok(self.b.get_u64())
    }
    fn bytes16(&mut self, what: &'static str, max: usize) -> Result<Bytes, ProtoError> {
        let len = self.u16(what)? as usize;
        if len > max {
            return Err(ProtoError::FieldTooLong {
                field: what,
                len,
                max,
            });
        }
        self.need(len, what)?;
        Ok(self.b.split_to(len))
    }
    fn string(&mut self, what: &'static str, max: usize) -> Result<String, ProtoError> {
        let b = self.bytes16(what, max)?;
        String::from_utf8(b.to_vec()).map_err(|_| ProtoError::NotUtf8(what))
    }
    fn path(&mut self, what: &'static str) -> Result<RelPath, ProtoError> {
        let b = self.bytes16(what, MAX_PATH_LEN)?;
        Ok(RelPath::new(b.to_vec())?)
    }
    fn mtime(&mut self) -> Result<Mtime, ProtoError> {
        self.need(12, "mtime")?;
        let secs = self.b.get_i64();
        let nanos = self.b.get_u32();
        if nanos >= 1_000_000_000 {
            return Err(ProtoError::BadValue {
                field: "mtime nanoseconds",
                value: nanos as u64,
            });
        }
        Ok(Mtime { secs, nanos })
    }
    fn done(self) -> Result<(), ProtoError> {
        if self.b.has_remaining() {
            Err(ProtoError::Trailing(self.b.remaining()))
        } else {
            Ok(())
        }
    }
}

fn decode_message(frame: Bytes) -> Result<Message, ProtoError> {
    let mut r = Rd { b: frame };
    let k = r.u8("kind")?;
    let msg = match k {
        kind::HELLO => Message::Hello(Hello {
            version: r.u16("version")?,
            node: r.string("node", MAX_NAME)?,
            epoch: r.u64("epoch")?,
            last_seq: r.u64("last_seq")?,
        }),
        kind::WELCOME => Message::Welcome(Welcome {
            node: r.string("node", MAX_NAME)?,
            epoch: r.u64("epoch")?,
            applied_epoch: r.u64("applied_epoch")?,
            applied_seq: r.u64("applied_seq")?,
            instance: r.u64("instance")?,
            version: if r.b.has_remaining() {
                Some(r.u16("version")?)
            } else {
                None
            },
        }),
        kind::VERSIONS => {
            let min = r.u16("min version")?;
            let max = r.u16("max version")?;
            if min == 0 || min > max {
                return Err(ProtoError::BadValue {
                    field: "version range",
                    value: u64::from(min) << 16 | u64::from(max),
                });
            }
            Message::Versions(WireVersions { min, max })
        }
        kind::REFUSE => Message::Refuse(Refuse {
            code: RefuseCode::from_u16(r.u16("code")?),
            epoch: r.u64("epoch")?,
            message: r.string("message", MAX_TEXT)?,
        }),
        kind::MANIFEST_REQUEST => Message::ManifestRequest {
            verify: match r.u8("verify")? {
                0 => false,
                1 => true,
                v => {
                    return Err(ProtoError::BadValue {
                        field: "verify",
                        value: v as u64,
                    })
                }
            },
            prefix: {
                let b = r.bytes16("prefix", MAX_PATH_LEN)?;
                if b.is_empty() {
                    None
                } else {
                    Some(RelPath::new(b.to_vec())?)
                }
            },
        },
        kind::MANIFEST_ENTRY => {
            let path = r.path("path")?;
            let kind = match r.u8("entry kind")? {
                0 => EntryKind::File,
                1 => EntryKind::Dir,
                2 => EntryKind::Symlink,
                v => {
                    return Err(ProtoError::BadValue {
                        field: "entry kind",
                        value: v as u64,
                    })
                }
            };
            Message::ManifestEntry(Entry {
                path,
                kind,
                mode: r.u32("mode")?,
                size: r.u64("size")?,
                mtime: r.mtime()?,
                target: r.bytes16("target", MAX_LINK_LEN)?.to_vec(),
                hash: match r.u8("hash flag")? {
                    0 => None,
                    1 => {
                        r.need(32, "hash")?;
                        let mut h = [0u8; 32];
                        r.b.copy_to_slice(&mut h);
                        Some(h)
                    }
                    v => {
                        return Err(ProtoError::BadValue {
                            field: "hash flag",
                            value: v as u64,
                        })
                    }
                },
            })
        }
        kind::MANIFEST_END => Message::ManifestEnd {
            count: r.u64("count")?,
        },
        kind::BATCH_BEGIN => {
            let epoch = r.u64("epoch")?;
            let seq = r.u64("seq")?;
            let sealed_at_ns = r.u64("sealed_at")?;
            let flags = r.u8("flags")?;
            if flags & !3 != 0 {
                return Err(ProtoError::BadValue {
                    field: "batch flags",
                    value: flags as u64,
                });
            }
            Message::BatchBegin(BatchHeader {
                epoch,
                seq,
                sealed_at_ns,
                exact: flags & 1 != 0,
                resync: flags & 2 != 0,
            })
        }
        kind::OP_MKDIR => Message::Op(Op::Mkdir {
            path: r.path("path")?,
            mode: r.u32("mode")?,
        }),
        kind::OP_SYMLINK => Message::Op(Op::Symlink {
            path: r.path("path")?,
            target: r.bytes16("target", MAX_LINK_LEN)?.to_vec(),
            mtime: r.mtime()?,
        }),
        kind::OP_DELETE => Message::Op(Op::Delete {
            path: r.path("path")?,
        }),
        kind::OP_RENAME => Message::Op(Op::Rename {
            from: r.path("from")?,
            to: r.path("to")?,
        }),
        kind::OP_SETMETA => Message::Op(Op::SetMeta {
            path: r.path("path")?,
            mode: r.u32("mode")?,
            mtime: r.mtime()?,
        }),
        kind::FILE_BEGIN => {
            let path = r.path("path")?;
            let mode = r.u32("mode")?;
            let mtime = r.mtime()?;
            let size = r.u64("size")?;
            if size > MAX_FILE_SIZE {
                return Err(ProtoError::BadValue {
                    field: "file size",
                    value: size,
                });
            }
            Message::FileBegin(FileHeader {
                path,
                mode,
                mtime,
                size,
            })
        }
        kind::FILE_APPEND => {
            let path = r.path("path")?;
            let offset = r.u64("offset")?;
            let prev_mtime = r.mtime()?;
            let size = r.u64("size")?;
            let mode = r.u32("mode")?;
            let mtime = r.mtime()?;
            if size > MAX_FILE_SIZE || offset >= size {
                return Err(ProtoError::BadValue {
                    field: "append range",
                    value: size,
                });
            }
            Message::FileAppend(AppendHeader {
                path,
                offset,
                prev_mtime,
                size,
                mode,
                mtime,
            })
        }
        kind::FILE_DATA => {
            let len = r.b.remaining();
            if len > MAX_DATA {
                return Err(ProtoError::FieldTooLong {
                    field: "file data",
                    len,
                    max: MAX_DATA,
                });
            }
            let d = r.b.split_to(len);
            Message::FileData(d)
        }
        kind::FILE_DATA_Z => {
            let raw_len = r.u32("raw_len")?;
            if raw_len as usize > MAX_DATA {
                return Err(ProtoError::FieldTooLong {
                    field: "decompressed file data",
                    len: raw_len as usize,
                    max: MAX_DATA,
                });
            }
            let len = r.b.remaining();
            if len == 0 {
                return Err(ProtoError::Truncated("compressed file data"));
            }
            if len > MAX_DATA {
                return Err(ProtoError::FieldTooLong {
                    field: "compressed file data",
                    len,
                    max: MAX_DATA,
                });
            }
            let data = r.b.split_to(len);
            Message::FileDataZ { raw_len, data }
        }
        kind::FILE_COPY => {
            let src = r.path("src")?;
            let offset = r.u64("offset")?;
            let len = r.u64("len")?;
            if len == 0 || len > MAX_FILE_SIZE || offset > MAX_FILE_SIZE {
                return Err(ProtoError::BadValue {
                    field: "copy length",
                    value: len,
                });
            }
            Message::FileCopy { src, offset, len }
        }
        kind::FILE_PATCH => {
            let path = r.path("path")?;
            let prev_size = r.u64("prev_size")?;
            let prev_mtime = r.mtime()?;
            let size = r.u64("size")?;
            let mode = r.u32("mode")?;
            let mtime = r.mtime()?;
            let n = r.u32("range count")? as usize;
            if n > MAX_PATCH_RANGES {
                return Err(ProtoError::FieldTooLong {
                    field: "patch ranges",
                    len: n,
                    max: MAX_PATCH_RANGES,
                });
            }
            if size > MAX_FILE_SIZE || prev_size > MAX_FILE_SIZE {
                return Err(ProtoError::BadValue {
                    field: "patch size",
                    value: size.max(prev_size),
                });
            }
            r.need(n * 16, "patch ranges")?;
            let mut ranges = Vec::with_capacity(n);
            let mut end = 0u64;
            for _ in 0..n {
                let o = r.u64("range offset")?;
                let l = r.u64("range length")?;
                // sorted, disjoint, non-empty, within the new size
                if l == 0 || o < end || o.checked_add(l).is_none_or(|e| e > size) {
                    return Err(ProtoError::BadValue {
                        field: "patch range",
                        value: o,
                    });
                }
                end = o + l;
                ranges.push((o, l));
            }
            Message::FilePatch(PatchHeader {
                path,
                prev_size,
                prev_mtime,
                size,
                mode,
                mtime,
                ranges,
            })
        }
        kind::FILE_END => {
            r.need(32, "hash")?;
            let mut hash = [0u8; 32];
            r.b.copy_to_slice(&mut hash);
            Message::FileEnd { hash }
        }
        kind::FILE_ABORT => Message::FileAbort,
        kind::BATCH_END => Message::BatchEnd { seq: r.u64("seq")? },
        kind::ACK => Message::Ack {
            epoch: r.u64("epoch")?,
            seq: r.u64("seq")?,
        },
        kind::PROMOTE => Message::Promote {
            epoch: r.u64("epoch")?,
            seq: r.u64("seq")?,
        },
        kind::EPOCH_BASE => Message::EpochBase {
            epoch: r.u64("epoch")?,
            base_epoch: r.u64("base_epoch")?,
            base_seq: r.u64("base_seq")?,
            base_sealed_at_ns: r.u64("base_sealed_at_ns")?,
        },
        other => return Err(ProtoError::UnknownKind(other)),
    };
    r.done()?;
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello(Hello {
                version: VERSION,
                node: "eu-west".into(),
                epoch: 3,
                last_seq: 99,
            }),
            Message::Welcome(Welcome {
                node: "us-east".into(),
                epoch: 3,
                applied_epoch: 2,
                applied_seq: 7,
                instance: 7,
                version: None,
            }),
            Message::Welcome(Welcome {
                node: "us-east".into(),
                epoch: 3,
                applied_epoch: 2,
                applied_seq: 7,
                instance: 7,
                version: Some(2),
            }),
            Message::Versions(WireVersions { min: 1, max: 2 }),
            Message::Refuse(Refuse {
                code: RefuseCode::StaleEpoch,
                epoch: 4,
                message: "stale".into(),
            }),
            Message::ManifestRequest {
                verify: true,
                prefix: None,
            },
            Message::ManifestRequest {
                verify: false,
                prefix: Some(p("a/b")),
            },
            Message::ManifestEntry(Entry {
                path: p("a/b"),
                kind: EntryKind::Symlink,
                mode: 0,
                size: 3,
                mtime: Mtime { secs: -5, nanos: 7 },
                target: b"../c".to_vec(),
                hash: None,
            }),
            Message::ManifestEntry(Entry {
                path: p("f"),
                kind: EntryKind::File,
                mode: 0o644,
                size: 3,
                mtime: Mtime { secs: 5, nanos: 7 },
                target: Vec::new(),
                hash: Some([9; 32]),
            }),
            Message::ManifestEnd { count: 12 },
            Message::BatchBegin(BatchHeader {
                epoch: 1,
                seq: 2,
                sealed_at_ns: 3,
                exact: true,
                resync: true,
            }),
            Message::Op(Op::Mkdir {
                path: p("d"),
                mode: 0o755,
            }),
            Message::Op(Op::Symlink {
                path: p("l"),
                target: b"x".to_vec(),
                mtime: Mtime::default(),
            }),
            Message::Op(Op::Delete { path: p("x/y") }),
            Message::Op(Op::Rename {
                from: p("a"),
                to: p("b"),
            }),
            Message::Op(Op::SetMeta {
                path: p("f"),
                mode: 0o600,
                mtime: Mtime { secs: 1, nanos: 2 },
            }),
            Message::FileBegin(FileHeader {
                path: p("f"),
                mode: 0o644,
                mtime: Mtime { secs: 9, nanos: 0 },
                size: 5,
            }),
            Message::FileAppend(AppendHeader {
                path: p("log"),
                offset: 10,
                prev_mtime: Mtime { secs: 3, nanos: 4 },
                size: 15,
                mode: 0o640,
                mtime: Mtime { secs: 5, nanos: 6 },
            }),
            Message::FileData(Bytes::from_static(b"hello")),
            Message::FileEnd { hash: [7; 32] },
            Message::FileAbort,
            Message::BatchEnd { seq: 2 },
            Message::Ack { epoch: 1, seq: 2 },
            Message::Promote { epoch: 3, seq: 9 },
            Message::FileDataZ {
                raw_len: 5,
                data: Bytes::from_static(b"zzz"),
            },
            Message::EpochBase {
                epoch: 3,
                base_epoch: 2,
                base_seq: 9,
                base_sealed_at_ns: 77,
            },
            Message::FileCopy {
                src: p("a/b"),
                offset: 65536,
                len: 4096,
            },
            Message::FilePatch(PatchHeader {
                path: p("db"),
                prev_size: 100,
                prev_mtime: Mtime { secs: 1, nanos: 2 },
                size: 120,
                mode: 0o600,
                mtime: Mtime { secs: 3, nanos: 4 },
                ranges: vec![(0, 10), (50, 5), (100, 20)],
            }),
        ]
    }

    #[test]
    fn a_head_and_its_payload_make_the_same_frame() {
        for m in [
            Message::FileData(Bytes::from(vec![7u8; 100_000])),
            Message::FileDataZ {
                raw_len: 200_000,
                data: Bytes::from(vec![9u8; 50_000]),
            },
        ] {
            let mut whole = BytesMut::new();
            encode(&m, &mut whole);
            let mut split = BytesMut::new();
            let payload = encode_head(&m, &mut split).unwrap();
            split.extend_from_slice(&payload);
            assert_eq!(whole, split);
            assert_eq!(decode_frame(&mut split).unwrap(), Some(m));
        }
        assert!(encode_head(&Message::FileAbort, &mut BytesMut::new()).is_none());
    }

    /// What a 0.1 node (wire version 1) sends and expects, byte for byte:
    /// a hello and a welcome without a version keep that layout, so a 0.1
    /// peer (whose decoder refuses trailing bytes) still reads them.
    #[test]
    fn version_1_layouts_are_frozen() {
        let mut buf = BytesMut::new();
        encode(
            &Message::Hello(Hello {
                version: 1,
                node: "ab".into(),
                epoch: 3,
                last_seq: 4,
            }),
            &mut buf,
        );
        let mut want = vec![0, 0, 0, 23, kind::HELLO, 0, 1, 0, 2, b'a', b'b'];
        want.extend_from_slice(&3u64.to_be_bytes());
        want.extend_from_slice(&4u64.to_be_bytes());
        assert_eq!(&buf[..], &want[..]);
        let mut buf = BytesMut::new();
        let w = Welcome {
            node: "ab".into(),
            epoch: 1,
            applied_epoch: 2,
            applied_seq: 3,
            instance: 4,
            version: None,
        };
        encode(&Message::Welcome(w.clone()), &mut buf);
        let mut want = vec![0, 0, 0, 37, kind::WELCOME, 0, 2, b'a', b'b'];
        for v in [1u64, 2, 3, 4] {
            want.extend_from_slice(&v.to_be_bytes());
        }
        assert_eq!(&buf[..], &want[..]);
        // a welcome with a version is the same bytes plus the version
        let mut buf2 = BytesMut::new();
        encode(
            &Message::Welcome(Welcome {
                version: Some(2),
                ..w
            }),
            &mut buf2,
        );
        assert_eq!(&buf2[4..buf.len()], &want[4..]);
        assert_eq!(&buf2[buf.len()..], &[0, 2]);
        // one odd trailing byte after a welcome is still refused
        let mut f = BytesMut::from(&want[..]);
        f[3] += 1;
        f.put_u8(9);
        assert_eq!(decode_frame(&mut f), Err(ProtoError::Truncated("version")));
    }

    #[test]
    fn version_ranges() {
        let r = |min, max| WireVersions { min, max };
        assert_eq!(r(1, 2).common(r(1, 1)), Some(1));
        assert_eq!(r(1, 1).common(r(1, 2)), Some(1));
        assert_eq!(r(1, 2).common(r(1, 2)), Some(2));
        assert_eq!(r(1, 2).common(r(2, 3)), Some(2));
        assert_eq!(r(2, 3).common(r(1, 1)), None);
        assert_eq!(r(1, 1).common(r(2, 3)), None);
        assert_eq!(r(3, 2).common(r(1, 4)), None);
        assert_eq!(r(1, 2).to_string(), "1..=2");
        assert_eq!(r(2, 2).to_string(), "2");
        // an empty or zero range from a peer is refused
        for (min, max) in [(0u16, 1u16), (3, 2)] {
            let mut f = BytesMut::new();
            f.put_u32(5);
            f.put_u8(kind::VERSIONS);
            f.put_u16(min);
            f.put_u16(max);
            assert!(matches!(
                decode_frame(&mut f),
                Err(ProtoError::BadValue { .. })
            ));
        }
    }

    #[test]
    fn round_trip_all_kinds() {
        let mut buf = BytesMut::new();
        for m in samples() {
            encode(&m, &mut buf);
        }
        let mut dec = FrameDecoder::new();
        // Feed one byte at a time: partial frames must wait, not fail.
        let all = buf.freeze();
        let mut out = Vec::new();
        for b in all.iter() {
            dec.extend(&[*b]);
            while let Some(m) = dec.next().unwrap() {
                out.push(m);
            }
        }
        assert_eq!(out, samples());
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn oversized_frame_rejected_before_buffering() {
        let mut buf = BytesMut::new();
        buf.put_u32((MAX_FRAME + 1) as u32);
        let mut dec = FrameDecoder::new();
        dec.extend(&buf);
        assert_eq!(dec.wanted(), Err(ProtoError::FrameTooLarge(MAX_FRAME + 1)));
        assert_eq!(dec.next(), Err(ProtoError::FrameTooLarge(MAX_FRAME + 1)));
        let mut huge = BytesMut::new();
        huge.put_u32(u32::MAX);
        assert!(matches!(
            decode_frame(&mut huge),
            Err(ProtoError::FrameTooLarge(_))
        ));
    }

    #[test]
    fn truncated_and_garbage_rejected() {
        // Every strict prefix of a message's payload, framed as if whole, is refused.
        for m in samples() {
            let mut buf = BytesMut::new();
            encode(&m, &mut buf);
            let payload = buf[4..].to_vec();
            for cut in 1..payload.len() {
                if matches!(m, Message::FileData(_))
                    || (matches!(m, Message::FileDataZ { .. }) && cut > 5)
                {
                    continue; // any length of data is a valid data frame
                }
                if matches!(&m, Message::Welcome(w) if w.version.is_some())
                    && cut == payload.len() - 2
                {
                    continue; // without its version: the version-1 welcome
                }
                let mut f = BytesMut::new();
                f.put_u32(cut as u32);
                f.put_slice(&payload[..cut]);
                let r = decode_frame(&mut f);
                assert!(r.is_err(), "{m:?} cut at {cut} decoded as {r:?}");
            }
            // trailing garbage
            if !matches!(m, Message::FileData(_) | Message::FileDataZ { .. }) {
                let mut f = BytesMut::new();
                f.put_u32(payload.len() as u32 + 1);
                f.put_slice(&payload);
                f.put_u8(0xAA);
                let want = match &m {
                    // one byte where a version may follow
                    Message::Welcome(w) if w.version.is_none() => ProtoError::Truncated("version"),
                    _ => ProtoError::Trailing(1),
                };
                assert_eq!(decode_frame(&mut f), Err(want));
            }
        }
        let mut f = BytesMut::from(&[0, 0, 0, 1, 200][..]);
        assert_eq!(decode_frame(&mut f), Err(ProtoError::UnknownKind(200)));
        let mut f = BytesMut::from(&[0, 0, 0, 0][..]);
        assert_eq!(decode_frame(&mut f), Err(ProtoError::EmptyFrame));
    }

    #[test]
    fn hostile_fields_rejected() {
        // a path that climbs out
        let mut f = BytesMut::new();
        f.put_u32(1 + 2 + 5 + 4);
        f.put_u8(kind::OP_MKDIR);
        f.put_u16(5);
        f.put_slice(b"../x/");
        f.put_u32(0o755);
        assert!(matches!(
            decode_frame(&mut f),
            Err(ProtoError::BadPath(PathError::DotComponent))
        ));
        // an announced file size far over the limit
        let mut buf = BytesMut::new();
        encode(
            &Message::FileBegin(FileHeader {
                path: p("f"),
                mode: 0,
                mtime: Mtime::default(),
                size: MAX_FILE_SIZE + 1,
            }),
            &mut buf,
        );
        assert!(matches!(
            decode_frame(&mut buf),
            Err(ProtoError::BadValue { .. })
        ));
        // a string length field larger than its limit
        let mut f = BytesMut::new();
        f.put_u32(1 + 2 + 2);
        f.put_u8(kind::HELLO);
        f.put_u16(1);
        f.put_u16(u16::MAX);
        assert!(matches!(
            decode_frame(&mut f),
            Err(ProtoError::FieldTooLong { .. })
        ));
    }

    proptest! {
        /// Arbitrary bytes never panic the decoder, and it never holds more
        /// than what it was fed.
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut dec = FrameDecoder::new();
            dec.extend(&data);
            for _ in 0..64 {
                match dec.next() {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
            prop_assert!(dec.buffered() <= data.len());
        }

        #[test]
        fn file_data_round_trips(data in proptest::collection::vec(any::<u8>(), 0..4096), epoch in any::<u64>(), seq in any::<u64>()) {
            let msgs = vec![Message::FileData(Bytes::from(data)), Message::Ack { epoch, seq }];
            let mut buf = BytesMut::new();
            for m in &msgs { encode(m, &mut buf); }
            let mut got = Vec::new();
            while let Some(m) = decode_frame(&mut buf).unwrap() { got.push(m); }
            prop_assert_eq!(got, msgs);
        }
    }
}
