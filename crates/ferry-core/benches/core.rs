//! Micro-benchmarks of ferry's CPU-bound building blocks, one core each
//! (issue 4): content-defined chunking and BLAKE3, the wire codec, and the
//! manifest diff. Throughput is in bytes, so criterion reports MB/s per core
//! (the diff also in entries per second).
//!
//! `cargo bench -p ferry-core --bench core` (about a minute); see
//! docs/BENCHMARKS.md for the figures.

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ferry_core::{chunk, diff};
use ferry_proto::{
    decode_frame, encode, Entry, EntryKind, FileHeader, FrameDecoder, Message, Mtime, Op, RelPath,
    MAX_DATA,
};
use std::hint::black_box;
use std::time::Duration;

/// Deterministic pseudo-random bytes (xorshift64): incompressible, and with
/// no structure FastCDC could exploit.
fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

fn configure<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g
}

/// (a) Chunking 16 MiB: cut + hash together (what the primary's reader does
/// per file), then the FastCDC cut alone and BLAKE3 alone.
fn chunking(c: &mut Criterion) {
    const N: usize = 16 << 20;
    let data = random_bytes(N, 1);
    let mut g = configure(c, "chunk");
    g.throughput(Throughput::Bytes(N as u64));
    g.bench_function("chunk_all_16MiB", |b| {
        b.iter(|| chunk::chunk_all(black_box(&data)))
    });
    let mut lens = Vec::with_capacity(N / chunk::MIN_CHUNK + 1);
    g.bench_function("cuts_16MiB", |b| {
        b.iter(|| {
            lens.clear();
            chunk::cuts(black_box(&data), true, &mut lens)
        })
    });
    g.bench_function("blake3_hash_16MiB", |b| {
        b.iter(|| blake3::hash(black_box(&data)))
    });
    g.finish();
}

fn path(s: &str) -> RelPath {
    RelPath::new(s).expect("valid path")
}

/// A batch of small messages as a batch of source files would send them:
/// one `FileBegin` and one `Op` (alternately `Mkdir` and `SetMeta`) per file.
fn small_messages(n: usize) -> Vec<Message> {
    let mtime = Mtime {
        secs: 1_764_000_000,
        nanos: 123_456_789,
    };
    (0..n)
        .map(|i| {
            let p = path(&format!("src/module_{:03}/file_{i:05}.rs", i / 100));
            if i % 2 == 0 {
                Message::FileBegin(FileHeader {
                    path: p,
                    mode: 0o644,
                    mtime,
                    size: 4096 + i as u64,
                })
            } else if i % 4 == 1 {
                Message::Op(Op::Mkdir {
                    path: p,
                    mode: 0o755,
                })
            } else {
                Message::Op(Op::SetMeta {
                    path: p,
                    mode: 0o600,
                    mtime,
                })
            }
        })
        .collect()
}

/// (b) The codec: one 1 MiB `FileData` frame (the largest the protocol
/// allows), and 1,000 small `FileBegin` / `Op` messages. `decode_frame` of
/// a `FileData` is zero-copy (the payload is a slice of the frame), so
/// `recv_filedata_1MiB` also times the copy into a [`FrameDecoder`] that a
/// receiver makes.
fn codec(c: &mut Criterion) {
    let data = Message::FileData(Bytes::from(random_bytes(MAX_DATA, 2)));
    let mut one = BytesMut::new();
    encode(&data, &mut one);
    let small = small_messages(1000);
    let mut many = BytesMut::new();
    for m in &small {
        encode(m, &mut many);
    }

    let mut g = configure(c, "codec");
    g.throughput(Throughput::Bytes(one.len() as u64));
    let mut out = BytesMut::with_capacity(one.len());
    g.bench_function("encode_filedata_1MiB", |b| {
        b.iter(|| {
            out.clear();
            encode(black_box(&data), &mut out);
        })
    });
    g.bench_function("decode_filedata_1MiB", |b| {
        b.iter_batched(
            || one.clone(),
            |mut buf| decode_frame(&mut buf).expect("decodes").expect("whole"),
            BatchSize::LargeInput,
        )
    });
    // what the receiver does: copy the stream's bytes into a FrameDecoder
    // (64 KiB reads), then take the frame out of it
    let mut dec = FrameDecoder::new();
    g.bench_function("recv_filedata_1MiB", |b| {
        b.iter(|| {
            for piece in black_box(&one[..]).chunks(64 << 10) {
                dec.extend(piece);
            }
            dec.next().expect("decodes").expect("whole")
        })
    });

    g.throughput(Throughput::Bytes(many.len() as u64));
    let mut out = BytesMut::with_capacity(many.len());
    g.bench_function("encode_op_filebegin_x1000", |b| {
        b.iter(|| {
            out.clear();
            for m in black_box(&small) {
                encode(m, &mut out);
            }
        })
    });
    g.bench_function("decode_op_filebegin_x1000", |b| {
        b.iter_batched(
            || many.clone(),
            |mut buf| {
                let mut n = 0;
                while let Some(m) = decode_frame(&mut buf).expect("decodes") {
                    black_box(m);
                    n += 1;
                }
                assert_eq!(n, 1000);
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// Two walk-ordered manifests of `n` entries (100 directories of files)
/// differing in 1 % of their entries: 0.5 % changed (another size and
/// mtime), 0.25 % only on the primary, 0.25 % only on the replica.
fn manifests(n: usize) -> (Vec<Entry>, Vec<Entry>) {
    let dirs = 100;
    let per = n / dirs - 1;
    let mk = |p: String, kind: EntryKind, size: u64, secs: i64| Entry {
        path: path(&p),
        kind,
        mode: if kind == EntryKind::Dir { 0o755 } else { 0o644 },
        size,
        mtime: Mtime { secs, nanos: 0 },
        target: Vec::new(),
        hash: None,
    };
    let (mut p, mut r) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for d in 0..dirs {
        let dir = format!("project/dir_{d:03}");
        p.push(mk(dir.clone(), EntryKind::Dir, 0, 1));
        r.push(mk(dir.clone(), EntryKind::Dir, 0, 1));
        for f in 0..per {
            let name = format!("{dir}/file_{f:05}.dat");
            let e = mk(name, EntryKind::File, 4096, 1_700_000_000);
            match f % 400 {
                0 | 200 => {
                    let mut changed = e.clone();
                    changed.size = 8192;
                    changed.mtime.secs += 60;
                    p.push(changed);
                    r.push(e);
                }
                100 => p.push(e),
                300 => r.push(e),
                _ => {
                    p.push(e.clone());
                    r.push(e);
                }
            }
        }
    }
    p.sort_by(|a, b| a.path.walk_cmp(&b.path));
    r.sort_by(|a, b| a.path.walk_cmp(&b.path));
    (p, r)
}

/// (c) The manifest diff (a resync's merge join) of 100,000 entries.
fn manifest_diff(c: &mut Criterion) {
    const N: usize = 100_000;
    let (p, r) = manifests(N);
    // bytes of both manifests as they cross the wire (ManifestEntry frames)
    let mut wire = BytesMut::new();
    for e in p.iter().chain(&r) {
        encode(&Message::ManifestEntry(e.clone()), &mut wire);
    }
    let expect = diff::diff(&p, |e| e, &r).len();
    assert!(expect > N / 200 && expect < N / 50, "{expect} actions");

    let mut g = configure(c, "diff");
    g.throughput(Throughput::Elements(p.len() as u64));
    g.bench_function("diff_100k_entries_1pct/entries", |b| {
        b.iter(|| diff::diff(black_box(&p), |e| e, black_box(&r)))
    });
    g.throughput(Throughput::Bytes(wire.len() as u64));
    g.bench_function("diff_100k_entries_1pct/manifest_bytes", |b| {
        b.iter(|| diff::diff(black_box(&p), |e| e, black_box(&r)))
    });
    g.finish();
}

criterion_group!(benches, chunking, codec, manifest_diff);
criterion_main!(benches);
