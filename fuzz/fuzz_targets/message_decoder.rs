//! One frame holding an arbitrary payload (kind byte + fields): decoding
//! never panics, every path it yields passes the shared path rule, and a
//! decoded message survives an encode/decode round trip unchanged.
#![no_main]

use bytes::{BufMut, BytesMut};
use ferry_proto::{decode_frame, encode, Message, Op, RelPath, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fn check_path(p: &RelPath) {
    assert!(RelPath::new(p.as_bytes().to_vec()).is_ok());
}

fuzz_target!(|payload: &[u8]| {
    if payload.len() > MAX_FRAME {
        return;
    }
    let mut f = BytesMut::with_capacity(payload.len() + 4);
    f.put_u32(payload.len() as u32);
    f.put_slice(payload);
    let Ok(Some(m)) = decode_frame(&mut f) else {
        return;
    };
    match &m {
        Message::Op(Op::Mkdir { path, .. })
        | Message::Op(Op::Delete { path })
        | Message::Op(Op::SetMeta { path, .. })
        | Message::Op(Op::Symlink { path, .. }) => check_path(path),
        Message::Op(Op::Rename { from, to }) => {
            check_path(from);
            check_path(to);
        }
        Message::FileBegin(h) => check_path(&h.path),
        Message::FileAppend(a) => {
            check_path(&a.path);
            assert!(a.offset < a.size);
        }
        Message::ManifestEntry(e) => check_path(&e.path),
        Message::FileCopy { src, len, .. } => {
            check_path(src);
            assert!(*len > 0);
        }
        Message::FilePatch(h) => {
            check_path(&h.path);
            // sorted, disjoint, non-empty, within the new size
            let mut end = 0u64;
            for &(o, l) in &h.ranges {
                assert!(l > 0 && o >= end && o + l <= h.size);
                end = o + l;
            }
        }
        _ => {}
    }
    let mut buf = BytesMut::new();
    encode(&m, &mut buf);
    let again = decode_frame(&mut buf).expect("re-encoded").expect("whole");
    assert_eq!(again, m);
});
