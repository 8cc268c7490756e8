//! The incremental frame decoder fed arbitrary bytes in arbitrary pieces:
//! it never panics, never buffers more than it was fed, refuses a length
//! over MAX_FRAME before waiting for its bytes, and every message it yields
//! re-encodes to a frame that decodes to the same message.
#![no_main]

use bytes::BytesMut;
use ferry_proto::{encode, FrameDecoder, ProtoError, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte chooses how the input is cut into reads.
    let (step, body) = match data.split_first() {
        Some((s, rest)) => ((*s as usize % 64) + 1, rest),
        None => return,
    };
    let mut dec = FrameDecoder::new();
    let mut fed = 0usize;
    for piece in body.chunks(step) {
        dec.extend(piece);
        fed += piece.len();
        loop {
            match dec.wanted() {
                Ok(w) => assert!(w >= 1 && w <= MAX_FRAME + 4),
                Err(ProtoError::FrameTooLarge(n)) => {
                    assert!(n > MAX_FRAME);
                    return;
                }
                Err(e) => panic!("wanted() failed with {e:?}"),
            }
            match dec.next() {
                Ok(Some(m)) => {
                    let mut buf = BytesMut::new();
                    encode(&m, &mut buf);
                    let again = ferry_proto::decode_frame(&mut buf)
                        .expect("a decoded message re-encodes")
                        .expect("into one whole frame");
                    assert_eq!(again, m);
                    assert!(buf.is_empty());
                }
                Ok(None) => break,
                Err(_) => return, // a refused frame ends the stream
            }
        }
        assert!(dec.buffered() <= fed);
    }
});
