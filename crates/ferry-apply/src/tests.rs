use super::*;
use ferry_proto::Mtime;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;

fn p(s: &str) -> RelPath {
    RelPath::new(s).unwrap()
}

fn mt(secs: i64) -> Mtime {
    Mtime { secs, nanos: 5 }
}

/// Receives one whole file into the current batch.
fn file(a: &mut Applier, path: &str, data: &[u8], mode: u32) -> Result<(), ApplyError> {
    a.file_begin(&FileHeader {
        path: p(path),
        mode,
        mtime: mt(1_600_000_000),
        size: data.len() as u64,
    })?;
    a.file_data(data)?;
    a.file_end(blake3::hash(data).as_bytes())
}

fn op(a: &mut Applier, o: Op) -> Result<(), ApplyError> {
    a.apply_op(&o)
}

struct Fixture {
    _d: tempfile::TempDir,
    root: std::path::PathBuf,
    state: std::path::PathBuf,
    outside: std::path::PathBuf,
    a: Applier,
    seq: u64,
}

impl Fixture {
    fn begin(&mut self) {
        self.seq += 1;
        self.a
            .begin(BatchInfo {
                epoch: 1,
                seq: self.seq,
                base_epoch: 1,
                base_seq: self.seq - 1,
                ..Default::default()
            })
            .unwrap();
    }
    /// One batch holding one step.
    fn one(
        &mut self,
        f: impl FnOnce(&mut Applier) -> Result<(), ApplyError>,
    ) -> Result<ApplyStats, ApplyError> {
        self.begin();
        f(&mut self.a)?;
        self.a.commit()
    }
}

fn fixture() -> Fixture {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    let state = d.path().join("state");
    let outside = d.path().join("outside");
    for x in [&root, &state, &outside] {
        std::fs::create_dir_all(x).unwrap();
    }
    let a = Applier::open(&root, Some(p(".ferry")), &state).unwrap();
    Fixture {
        _d: d,
        root,
        state,
        outside,
        a,
        seq: 0,
    }
}

fn no_temp_files(a: &Applier, root: &Path) {
    for e in walk(root).unwrap() {
        assert!(
            !e.file_name().unwrap().as_bytes().starts_with(TEMP_PREFIX),
            "temp file left: {e:?}"
        );
    }
    let staged = std::fs::read_dir(a.staging_path()).unwrap().count();
    assert_eq!(staged, 0, "staged files left");
}

#[test]
fn file_is_written_with_mode_and_mtime() {
    let mut f = fixture();
    f.one(|a| file(a, "d/e/file", b"hello", 0o640)).unwrap();
    let md = std::fs::metadata(f.root.join("d/e/file")).unwrap();
    assert_eq!(std::fs::read(f.root.join("d/e/file")).unwrap(), b"hello");
    assert_eq!(md.mode() & 0o7777, 0o640);
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_600_000_000, 5));
    no_temp_files(&f.a, &f.root);
}

#[test]
fn hash_or_size_mismatch_leaves_old_version() {
    let mut f = fixture();
    f.one(|a| file(a, "x", b"old", 0o644)).unwrap();
    let h = FileHeader {
        path: p("x"),
        mode: 0o644,
        mtime: Mtime::default(),
        size: 3,
    };
    f.begin();
    f.a.file_begin(&h).unwrap();
    f.a.file_data(b"new").unwrap();
    assert!(matches!(
        f.a.file_end(&[0; 32]),
        Err(ApplyError::BadStream { .. })
    ));
    f.a.file_begin(&h).unwrap();
    assert!(matches!(
        f.a.file_data(b"toolong"),
        Err(ApplyError::BadStream { .. })
    ));
    f.a.file_begin(&h).unwrap();
    f.a.file_data(b"ne").unwrap();
    assert!(matches!(
        f.a.file_end(blake3::hash(b"ne").as_bytes()),
        Err(ApplyError::BadStream { .. })
    ));
    f.a.reset();
    assert_eq!(std::fs::read(f.root.join("x")).unwrap(), b"old");
    no_temp_files(&f.a, &f.root);
}

#[test]
fn nothing_touches_the_tree_before_commit() {
    let mut f = fixture();
    f.one(|a| file(a, "keep", b"k", 0o644)).unwrap();
    f.begin();
    file(&mut f.a, "new", b"n", 0o644).unwrap();
    op(&mut f.a, Op::Delete { path: p("keep") }).unwrap();
    op(
        &mut f.a,
        Op::Mkdir {
            path: p("dir"),
            mode: 0o755,
        },
    )
    .unwrap();
    assert!(f.root.join("keep").exists());
    assert!(!f.root.join("new").exists() && !f.root.join("dir").exists());
    // a lost session: the batch is dropped, the tree is as it was
    f.a.reset();
    assert!(f.root.join("keep").exists() && !f.root.join("new").exists());
    no_temp_files(&f.a, &f.root);
    assert_eq!(f.a.recover((1, 1)).unwrap(), Recovery::Clean);
}

#[test]
fn symlink_on_replica_is_never_followed() {
    let mut f = fixture();
    std::os::unix::fs::symlink(&f.outside, f.root.join("evil")).unwrap();
    let r = f.one(|a| file(a, "evil/x", b"pwned", 0o644));
    assert!(matches!(r, Err(ApplyError::Inconsistent { .. })), "{r:?}");
    let r = f.one(|a| {
        op(
            a,
            Op::Mkdir {
                path: p("evil/sub"),
                mode: 0o755,
            },
        )
    });
    assert!(r.is_err());
    f.one(|a| {
        op(
            a,
            Op::Rename {
                from: p("evil"),
                to: p("evil2"),
            },
        )
    })
    .unwrap();
    // deleting through a link removes nothing outside
    std::fs::write(f.outside.join("keep"), b"k").unwrap();
    std::os::unix::fs::symlink(&f.outside, f.root.join("evil3")).unwrap();
    f.one(|a| {
        op(
            a,
            Op::Delete {
                path: p("evil3/keep"),
            },
        )
    })
    .unwrap();
    f.one(|a| op(a, Op::Delete { path: p("evil3") })).unwrap();
    assert!(f.outside.join("keep").exists());
    assert_eq!(std::fs::read_dir(&f.outside).unwrap().count(), 1);
    // SetMeta on a link does not chmod its target
    std::os::unix::fs::symlink(f.outside.join("keep"), f.root.join("l")).unwrap();
    let r = f.one(|a| {
        op(
            a,
            Op::SetMeta {
                path: p("l"),
                mode: 0o777,
                mtime: Mtime::default(),
            },
        )
    });
    assert!(r.is_err());
    assert_ne!(
        std::fs::metadata(f.outside.join("keep")).unwrap().mode() & 0o777,
        0o777
    );
    // an apply that hit an inconsistency leaves the tree between batches:
    // flagged until a resync batch completes
    assert!(f.a.needs_resync());
    assert_eq!(f.a.recover((1, f.seq - 1)).unwrap(), Recovery::NeedsResync);
    f.seq += 1;
    f.a.begin(BatchInfo {
        epoch: 1,
        seq: f.seq,
        resync: true,
        ..Default::default()
    })
    .unwrap();
    f.a.commit().unwrap();
    assert!(!f.a.needs_resync());
}

type Step = dyn Fn(&mut Applier) -> Result<(), ApplyError>;

/// G1 + G6: links are created with their target verbatim, whatever it
/// points at, and no later step of any kind goes through one.
#[test]
fn links_leaving_the_root_are_created_verbatim_and_never_followed() {
    let mut f = fixture();
    std::fs::write(f.outside.join("victim"), b"must never change").unwrap();
    let outside_abs = f.outside.as_os_str().as_encoded_bytes().to_vec();
    let links: Vec<(&str, Vec<u8>)> = vec![
        ("abs", outside_abs.clone()),
        ("etc", b"/etc".to_vec()),
        ("up", b"../outside".to_vec()),
        ("d/up2", b"../../outside".to_vec()),
        ("dangling", b"no/such/thing".to_vec()),
        ("dot", b".".to_vec()),
        ("chain", b"dot/../outside".to_vec()),
    ];
    f.one(|a| {
        for (l, t) in &links {
            op(
                a,
                Op::Symlink {
                    path: p(l),
                    target: t.clone(),
                    mtime: mt(1_500_000_000),
                },
            )?;
        }
        Ok(())
    })
    .unwrap();
    for (l, t) in &links {
        let got = std::fs::read_link(f.root.join(l)).unwrap();
        assert_eq!(got.as_os_str().as_encoded_bytes(), &t[..], "{l}");
        let md = std::fs::symlink_metadata(f.root.join(l)).unwrap();
        assert_eq!(md.mtime(), 1_500_000_000, "{l}: the link's own mtime");
    }
    // the links really lead outside: a careless open would land there
    assert!(f.root.join("abs/victim").exists() && f.root.join("up/victim").exists());
    let outside = f.outside.clone();
    let outside_state = || {
        let mut v: Vec<(String, Vec<u8>, u32)> = std::fs::read_dir(&outside)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let md = std::fs::symlink_metadata(e.path()).unwrap();
                let body = std::fs::read(e.path()).unwrap_or_default();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    body,
                    md.mode(),
                )
            })
            .collect();
        v.sort();
        // the outside dir itself: a chmod through a link would land here
        let md = std::fs::metadata(&outside).unwrap();
        v.push((".".into(), md.mtime().to_be_bytes().to_vec(), md.mode()));
        v
    };
    let before = outside_state();
    for via in ["abs", "up", "d/up2", "chain"] {
        // each step below would write outside if a link were followed
        let steps: Vec<Box<Step>> = vec![
            Box::new(move |a| file(a, &format!("{via}/victim"), b"pwned", 0o644)),
            Box::new(move |a| file(a, &format!("{via}/new"), b"pwned", 0o644)),
            Box::new(move |a| {
                op(
                    a,
                    Op::Mkdir {
                        path: p(&format!("{via}/sub")),
                        mode: 0o777,
                    },
                )
            }),
            Box::new(move |a| {
                op(
                    a,
                    Op::Delete {
                        path: p(&format!("{via}/victim")),
                    },
                )
            }),
            Box::new(move |a| {
                op(
                    a,
                    Op::SetMeta {
                        path: p(&format!("{via}/victim")),
                        mode: 0o777,
                        mtime: Mtime::default(),
                    },
                )
            }),
            Box::new(move |a| {
                op(
                    a,
                    Op::SetMeta {
                        path: p(via),
                        mode: 0o777,
                        mtime: Mtime::default(),
                    },
                )
            }),
            Box::new(move |a| {
                op(
                    a,
                    Op::Symlink {
                        path: p(&format!("{via}/planted")),
                        target: b"x".to_vec(),
                        mtime: Mtime::default(),
                    },
                )
            }),
        ];
        for step in steps {
            let _ = f.one(|a| step(a));
            f.a.reset();
            assert_eq!(outside_state(), before, "through {via}");
        }
    }
    // a file sent under a link's own name replaces the link, never writes
    // through it
    f.one(|a| file(a, "abs", b"a file now", 0o644)).unwrap();
    let md = std::fs::symlink_metadata(f.root.join("abs")).unwrap();
    assert!(md.is_file());
    assert_eq!(std::fs::read(f.root.join("abs")).unwrap(), b"a file now");
    // a directory too
    f.one(|a| {
        op(
            a,
            Op::Mkdir {
                path: p("up"),
                mode: 0o700,
            },
        )
    })
    .unwrap();
    assert!(std::fs::symlink_metadata(f.root.join("up"))
        .unwrap()
        .is_dir());
    assert_eq!(outside_state(), before);
    // renaming a link moves the link, not what it points at
    f.one(|a| {
        op(
            a,
            Op::Rename {
                from: p("d/up2"),
                to: p("moved"),
            },
        )
    })
    .unwrap();
    let got = std::fs::read_link(f.root.join("moved")).unwrap();
    assert_eq!(got.as_os_str().as_encoded_bytes(), b"../../outside");
    assert!(f.root.join("d").is_dir() && !f.root.join("d/up2").exists());
    assert_eq!(outside_state(), before);
}

/// A step the replica's filesystem cannot hold (here a link target of
/// 4096 bytes: the kernel holds at most 4095) is skipped and reported with
/// its path; the rest of the batch applies, and the batch commits (no
/// failure a resync would only repeat).
#[test]
fn a_step_the_filesystem_refuses_is_skipped_and_the_rest_applies() {
    let mut f = fixture();
    f.one(|a| {
        file(a, "before", b"1", 0o644)?;
        op(
            a,
            Op::Symlink {
                path: p("d/too-long"),
                target: vec![b'a'; 4096],
                mtime: Mtime::default(),
            },
        )?;
        file(a, "d/after", b"2", 0o644)
    })
    .unwrap();
    assert_eq!(std::fs::read(f.root.join("before")).unwrap(), b"1");
    assert_eq!(std::fs::read(f.root.join("d/after")).unwrap(), b"2");
    assert!(std::fs::symlink_metadata(f.root.join("d/too-long")).is_err());
    let skipped = f.a.take_skipped();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert_eq!(skipped[0].path, "d/too-long");
    assert!(skipped[0].error.contains("too long"), "{skipped:?}");
    assert!(f.a.take_skipped().is_empty(), "reported once");
    assert!(!f.a.needs_resync());
    no_temp_files(&f.a, &f.root);
}

#[test]
fn hostile_requests_refused_on_receipt() {
    let mut f = fixture();
    f.begin();
    for target in [&b""[..], b"a\0b"] {
        let r = op(
            &mut f.a,
            Op::Symlink {
                path: p("l"),
                target: target.to_vec(),
                mtime: Mtime::default(),
            },
        );
        assert!(matches!(r, Err(ApplyError::Refused { .. })), "{r:?}");
    }
    let r = file(&mut f.a, "suid", b"x", 0o4755);
    assert!(matches!(r, Err(ApplyError::Refused { .. })), "{r:?}");
    let r = op(
        &mut f.a,
        Op::Mkdir {
            path: p("d"),
            mode: 0o2755,
        },
    );
    assert!(matches!(r, Err(ApplyError::Refused { .. })), "{r:?}");
    std::fs::create_dir_all(f.root.join(".ferry")).unwrap();
    std::fs::write(f.root.join(".ferry/state.a"), b"s").unwrap();
    let r = op(&mut f.a, Op::Delete { path: p(".ferry") });
    assert!(matches!(r, Err(ApplyError::Refused { .. })), "{r:?}");
    let r = file(&mut f.a, ".ferry/state.a", b"x", 0o644);
    assert!(matches!(r, Err(ApplyError::Refused { .. })), "{r:?}");
    let r = file(&mut f.a, ".ferry.tmp.staging/0", b"x", 0o644);
    assert!(matches!(r, Err(ApplyError::Refused { .. })), "{r:?}");
    let r = op(
        &mut f.a,
        Op::Rename {
            from: p("a"),
            to: p("a/b"),
        },
    );
    assert!(matches!(r, Err(ApplyError::Refused { .. })), "{r:?}");
    // a nested .ferry is ordinary data
    file(&mut f.a, "app/.ferry/x", b"ok", 0o644).unwrap();
    f.a.commit().unwrap();
    assert!(f.root.join(".ferry/state.a").exists());
    assert!(f.root.join("app/.ferry/x").exists());
    assert!(!f.root.join("suid").exists());
    assert_eq!(std::fs::read_dir(&f.outside).unwrap().count(), 0);
}

#[test]
fn renames_deletes_and_kind_changes() {
    let mut f = fixture();
    f.one(|a| {
        file(a, "a/x", b"1", 0o644)?;
        file(a, "a/y/z", b"2", 0o644)?;
        op(
            a,
            Op::Rename {
                from: p("a"),
                to: p("b"),
            },
        )?;
        // the cache must not send writes for a re-created `a` into `b`
        file(a, "a/new", b"3", 0o644)
    })
    .unwrap();
    assert_eq!(std::fs::read(f.root.join("b/y/z")).unwrap(), b"2");
    assert!(!f.root.join("b/new").exists());
    assert!(f.root.join("a/new").exists());
    // a file replaces a directory, a directory replaces a file
    f.one(|a| file(a, "b", b"file now", 0o644)).unwrap();
    assert_eq!(std::fs::read(f.root.join("b")).unwrap(), b"file now");
    f.one(|a| {
        op(
            a,
            Op::Mkdir {
                path: p("b"),
                mode: 0o700,
            },
        )
    })
    .unwrap();
    assert!(f.root.join("b").is_dir());
    // rename onto a non-empty directory replaces it
    f.one(|a| {
        op(
            a,
            Op::Rename {
                from: p("a"),
                to: p("b"),
            },
        )
    })
    .unwrap();
    assert!(f.root.join("b/new").exists());
    // a missing source is never guessed around, even with something at `to`
    let r = f.one(|a| {
        op(
            a,
            Op::Rename {
                from: p("a"),
                to: p("b"),
            },
        )
    });
    assert!(matches!(r, Err(ApplyError::Inconsistent { .. })), "{r:?}");
    // a directory renamed over a file the batch deletes later: the file goes
    std::fs::create_dir_all(f.root.join("dirA")).unwrap();
    std::fs::write(f.root.join("dirA/in"), b"i").unwrap();
    std::fs::write(f.root.join("fileB"), b"stale").unwrap();
    f.one(|a| {
        op(
            a,
            Op::Rename {
                from: p("dirA"),
                to: p("fileB"),
            },
        )?;
        op(a, Op::Delete { path: p("fileB") })?;
        op(a, Op::Delete { path: p("b") })?;
        op(a, Op::Delete { path: p("b") })?;
        op(
            a,
            Op::Symlink {
                path: p("link"),
                target: b"x/./y".to_vec(),
                mtime: Mtime::default(),
            },
        )
    })
    .unwrap();
    assert_eq!(
        std::fs::read_link(f.root.join("link")).unwrap(),
        Path::new("x/./y")
    );
    let mut names: Vec<_> = std::fs::read_dir(&f.root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, vec![std::ffi::OsString::from("link")]);
}

#[test]
fn staged_files_land_together_and_in_order() {
    let mut f = fixture();
    f.begin();
    // many files: flushed with one syncfs, then renamed into place
    for i in 0..40 {
        file(&mut f.a, &format!("d/f{i}"), b"x", 0o644).unwrap();
    }
    // not visible before they are durable
    assert!(!f.root.join("d/f0").exists());
    // a later step on a staged path sees it in place
    op(
        &mut f.a,
        Op::Rename {
            from: p("d/f3"),
            to: p("d/g3"),
        },
    )
    .unwrap();
    // the same path twice in a batch: the later version wins
    file(&mut f.a, "twice", b"1", 0o644).unwrap();
    file(&mut f.a, "twice", b"2", 0o644).unwrap();
    let stats = f.a.commit().unwrap();
    assert!(f.root.join("d/g3").exists() && f.root.join("d/f39").exists());
    assert!(!f.root.join("d/f3").exists());
    assert_eq!(stats.files, 42);
    assert_eq!(std::fs::read(f.root.join("twice")).unwrap(), b"2");
    no_temp_files(&f.a, &f.root);
    // a reset drops staged files without leaving temp files behind
    f.begin();
    file(&mut f.a, "dropped", b"x", 0o644).unwrap();
    f.a.reset();
    assert!(!f.root.join("dropped").exists());
    no_temp_files(&f.a, &f.root);
}

#[test]
fn no_space_is_reported_as_such() {
    let e = io_err("write", &p("x"), io::Error::from_raw_os_error(28));
    assert!(matches!(e, ApplyError::NoSpace { .. }));
    assert!(e.to_string().contains("no space"));
}

fn append_hdr(offset: u64, prev_mtime: Mtime, size: u64) -> ferry_proto::AppendHeader {
    ferry_proto::AppendHeader {
        path: p("log"),
        offset,
        prev_mtime,
        size,
        mode: 0o600,
        mtime: mt(1_700_000_000),
    }
}

fn append(a: &mut Applier, h: ferry_proto::AppendHeader, tail: &[u8]) -> Result<(), ApplyError> {
    a.append_begin(&h)?;
    a.file_data(tail)?;
    a.file_end(blake3::hash(tail).as_bytes())
}

/// Bytes for a patch or a copy-built file.
enum Part<'a> {
    Data(&'a [u8]),
    Copy(&'a str, u64, u64),
}

/// Feeds parts and ends with the hash of `expect` (what they add up to).
fn parts(a: &mut Applier, ps: &[Part], expect: &[u8]) -> Result<(), ApplyError> {
    for part in ps {
        match part {
            Part::Data(d) => a.file_data(d)?,
            Part::Copy(src, off, len) => a.file_copy(&p(src), *off, *len)?,
        }
    }
    a.file_end(blake3::hash(expect).as_bytes())
}

fn patch_hdr(prev: (u64, Mtime), size: u64, ranges: Vec<(u64, u64)>) -> ferry_proto::PatchHeader {
    ferry_proto::PatchHeader {
        path: p("big"),
        prev_size: prev.0,
        prev_mtime: prev.1,
        size,
        mode: 0o640,
        mtime: mt(1_700_000_000),
        ranges,
    }
}

/// The content of "big" in the crash batches: patterned, 20,000 bytes.
fn big0() -> Vec<u8> {
    (0..20_000u32).map(|x| (x * 7 % 253) as u8).collect()
}

/// "big" after the patch of crash batch 2.
fn big1() -> Vec<u8> {
    let mut b = big0();
    b[10..14].copy_from_slice(b"b-v1");
    b[9_000..9_006].copy_from_slice(b"PATCH!");
    b.truncate(19_990);
    b.extend_from_slice(&[b'z'; 20]);
    b
}

#[test]
fn patch_rewrites_ranges_in_place_and_copies_read_the_tree_before_the_batch() {
    let mut f = fixture();
    let big = big0();
    f.one(|a| {
        file(a, "big", &big, 0o644)?;
        file(a, "src", b"0123456789", 0o644)
    })
    .unwrap();
    let ino = std::fs::metadata(f.root.join("big")).unwrap().ino();
    let prev = (big.len() as u64, mt(1_600_000_000));
    // rewrite 100..110 from "src", 5000..5003 with data, grow by 7 bytes;
    // "src" is deleted in the same batch, after the copy was received
    let mut want = big.clone();
    want[100..110].copy_from_slice(b"0123456789");
    want[5000..5003].copy_from_slice(b"XYZ");
    want.extend_from_slice(b"-grown-");
    f.one(|a| {
        a.patch_begin(&patch_hdr(
            prev,
            20_007,
            vec![(100, 10), (5000, 3), (20_000, 7)],
        ))?;
        parts(
            a,
            &[
                Part::Copy("src", 0, 10),
                Part::Data(b"XYZ"),
                Part::Data(b"-grown-"),
            ],
            b"0123456789XYZ-grown-",
        )?;
        op(a, Op::Delete { path: p("src") })
    })
    .unwrap();
    assert_eq!(std::fs::read(f.root.join("big")).unwrap(), want);
    let md = std::fs::metadata(f.root.join("big")).unwrap();
    assert_eq!(md.ino(), ino, "patched in place");
    assert_eq!(md.mode() & 0o7777, 0o640);
    assert!(!f.root.join("src").exists());
    // a patch that shrinks the file
    let prev = (20_007, mt(1_700_000_000));
    f.one(|a| {
        a.patch_begin(&patch_hdr(prev, 50, vec![(40, 10)]))?;
        parts(
            a,
            &[Part::Copy("big", 5000, 3), Part::Data(b"1234567")],
            b"XYZ1234567",
        )
    })
    .unwrap();
    let mut short = want[..40].to_vec();
    short.extend_from_slice(b"XYZ1234567");
    assert_eq!(std::fs::read(f.root.join("big")).unwrap(), short);
    // a base that is not the one the primary diffed against is refused
    let r = f.one(|a| {
        a.patch_begin(&patch_hdr((51, mt(1_700_000_000)), 50, vec![(0, 1)]))?;
        parts(a, &[Part::Data(b"q")], b"q")
    });
    assert!(matches!(r, Err(ApplyError::Inconsistent { .. })), "{r:?}");
    assert_eq!(std::fs::read(f.root.join("big")).unwrap(), short);
    no_temp_files(&f.a, &f.root);
}

#[test]
fn a_copy_from_a_missing_short_or_outside_source_is_refused() {
    let mut f = fixture();
    f.one(|a| file(a, "s", b"short", 0o644)).unwrap();
    std::fs::write(f.outside.join("secret"), b"secret!").unwrap();
    std::os::unix::fs::symlink(f.outside.join("secret"), f.root.join("link")).unwrap();
    let hdr = |n| FileHeader {
        path: p("t"),
        mode: 0o644,
        mtime: mt(1),
        size: n,
    };
    for (src, off, len, what) in [
        ("nope", 0, 3, "missing"),
        ("s", 3, 5, "past its end"),
        ("link", 0, 7, "a symlink to outside"),
    ] {
        f.begin();
        f.a.file_begin(&hdr(len)).unwrap();
        let r = f.a.file_copy(&p(src), off, len);
        assert!(
            matches!(r, Err(ApplyError::Inconsistent { .. })),
            "{what}: {r:?}"
        );
        f.a.reset();
    }
    assert!(!f.root.join("t").exists());
    // a copy must fit the announced size, and stay out of the state dir
    f.begin();
    f.a.file_begin(&hdr(2)).unwrap();
    assert!(matches!(
        f.a.file_copy(&p("s"), 0, 5),
        Err(ApplyError::BadStream { .. })
    ));
    f.a.reset();
    // wrong bytes fail the file's hash at its end
    f.begin();
    f.a.file_begin(&hdr(5)).unwrap();
    f.a.file_copy(&p("s"), 0, 5).unwrap();
    assert!(f.a.file_end(blake3::hash(b"other").as_bytes()).is_err());
    f.a.reset();
    assert!(!f.root.join("t").exists());
}

#[test]
fn append_extends_in_place_or_refuses_a_different_base() {
    let mut f = fixture();
    f.one(|a| file(a, "log", b"hello", 0o644)).unwrap();
    let prev = mt(1_600_000_000);
    let ino = std::fs::metadata(f.root.join("log")).unwrap().ino();
    // a wrong base (size or mtime) writes nothing
    let r = f.one(|a| append(a, append_hdr(4, prev, 9), b"abcde"));
    assert!(matches!(r, Err(ApplyError::Inconsistent { .. })), "{r:?}");
    let r = f.one(|a| append(a, append_hdr(5, Mtime::default(), 9), b"abcd"));
    assert!(matches!(r, Err(ApplyError::Inconsistent { .. })), "{r:?}");
    assert_eq!(std::fs::read(f.root.join("log")).unwrap(), b"hello");
    // an aborted append leaves the old version, mtime included
    f.begin();
    f.a.append_begin(&append_hdr(5, prev, 11)).unwrap();
    f.a.file_data(b" wor").unwrap();
    f.a.file_abort();
    // a tail that does not match its hash is dropped too
    f.a.append_begin(&append_hdr(5, prev, 11)).unwrap();
    f.a.file_data(b" world").unwrap();
    assert!(f.a.file_end(&[0; 32]).is_err());
    f.a.commit().unwrap();
    assert_eq!(std::fs::read(f.root.join("log")).unwrap(), b"hello");
    let md = std::fs::metadata(f.root.join("log")).unwrap();
    assert_eq!((md.mtime(), md.mtime_nsec()), (prev.secs, 5));
    // the real thing: extended in place (same inode), new mode and mtime
    let st = f
        .one(|a| append(a, append_hdr(5, prev, 11), b" world"))
        .unwrap();
    assert_eq!(st.bytes, 6);
    assert_eq!(std::fs::read(f.root.join("log")).unwrap(), b"hello world");
    let md = std::fs::metadata(f.root.join("log")).unwrap();
    assert_eq!(md.ino(), ino, "appended in place, not copied");
    assert_eq!(md.mode() & 0o777, 0o600);
    assert_eq!(md.mtime(), 1_700_000_000);
    no_temp_files(&f.a, &f.root);
}

// ---- crash recovery ---------------------------------------------------

type Snapshot = BTreeMap<String, (char, Vec<u8>, u32)>;

fn snapshot(root: &Path) -> Snapshot {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            if rel == STAGING_DIR {
                continue;
            }
            let md = std::fs::symlink_metadata(&path).unwrap();
            let v = if md.is_dir() {
                stack.push(path.clone());
                ('d', Vec::new(), md.mode() & 0o7777)
            } else if md.file_type().is_symlink() {
                (
                    'l',
                    std::fs::read_link(&path)
                        .unwrap()
                        .as_os_str()
                        .as_bytes()
                        .to_vec(),
                    0,
                )
            } else {
                ('f', std::fs::read(&path).unwrap(), md.mode() & 0o7777)
            };
            out.insert(rel, v);
        }
    }
    out
}

/// Batches with the steps a crash can hurt: a rename whose source is
/// re-created later in the batch, a delete then a re-creation, appends,
/// directory moves, tree deletes, kind changes, many files (syncfs path).
fn crash_batch(a: &mut Applier, i: u64) -> Result<(), ApplyError> {
    let log0: Vec<u8> = (0..3000u32).map(|x| (x % 251) as u8).collect();
    match i {
        1 => {
            op(
                a,
                Op::Mkdir {
                    path: p("d"),
                    mode: 0o750,
                },
            )?;
            file(a, "d/a", b"a-v1", 0o644)?;
            file(a, "d/b", b"b-v1", 0o644)?;
            file(a, "log", &log0, 0o644)?;
            file(a, "big", &big0(), 0o644)?;
            op(
                a,
                Op::Symlink {
                    path: p("l"),
                    target: b"d/a".to_vec(),
                    mtime: Mtime::default(),
                },
            )?;
            for k in 0..12 {
                file(a, &format!("many/f{k}"), format!("m{k}").as_bytes(), 0o644)?;
            }
            Ok(())
        }
        2 => {
            op(
                a,
                Op::Rename {
                    from: p("d/a"),
                    to: p("d/a2"),
                },
            )?;
            file(a, "d/a", b"a-v2", 0o644)?;
            op(a, Op::Delete { path: p("d/b") })?;
            file(a, "d/b", b"b-v2", 0o600)?;
            append(
                a,
                ferry_proto::AppendHeader {
                    path: p("log"),
                    offset: 3000,
                    prev_mtime: mt(1_600_000_000),
                    size: 3010,
                    mode: 0o644,
                    mtime: mt(1_650_000_000),
                },
                b"0123456789",
            )?;
            // an in-place patch: a copy from a file deleted later in the
            // batch (copies read the tree before it), data, growth
            a.patch_begin(&patch_hdr(
                (20_000, mt(1_600_000_000)),
                20_010,
                vec![(10, 4), (9_000, 6), (19_990, 20)],
            ))?;
            let mut tail = b"b-v1".to_vec();
            tail.extend_from_slice(b"PATCH!");
            tail.extend_from_slice(&[b'z'; 20]);
            parts(
                a,
                &[
                    Part::Copy("d/b", 0, 4),
                    Part::Data(b"PATCH!"),
                    Part::Data(&[b'z'; 20]),
                ],
                &tail,
            )?;
            op(
                a,
                Op::SetMeta {
                    path: p("d/a2"),
                    mode: 0o600,
                    mtime: mt(1_500_000_000),
                },
            )
        }
        3 => {
            op(
                a,
                Op::Rename {
                    from: p("d"),
                    to: p("e"),
                },
            )?;
            op(
                a,
                Op::Mkdir {
                    path: p("d"),
                    mode: 0o755,
                },
            )?;
            file(a, "d/new", b"new", 0o644)?;
            op(a, Op::Delete { path: p("many") })?;
            file(a, "l", b"was a link", 0o644)?;
            append(
                a,
                ferry_proto::AppendHeader {
                    path: p("log"),
                    offset: 3010,
                    prev_mtime: mt(1_650_000_000),
                    size: 3013,
                    mode: 0o640,
                    mtime: mt(1_660_000_000),
                },
                b"abc",
            )?;
            // a file built from chunks the replica holds, and a patch that
            // shrinks the file it copies from
            let big = big1();
            let mut built = big[..5_000].to_vec();
            built.extend_from_slice(b"mid");
            built.extend_from_slice(&big[15_000..19_990]);
            a.file_begin(&FileHeader {
                path: p("built"),
                mode: 0o644,
                mtime: mt(1_600_000_000),
                size: built.len() as u64,
            })?;
            parts(
                a,
                &[
                    Part::Copy("big", 0, 5_000),
                    Part::Data(b"mid"),
                    Part::Copy("big", 15_000, 4_990),
                ],
                &built,
            )?;
            a.patch_begin(&patch_hdr(
                (20_010, mt(1_700_000_000)),
                12_000,
                vec![(11_000, 1_000)],
            ))?;
            parts(a, &[Part::Data(&[b'q'; 1_000])], &[b'q'; 1_000])
        }
        _ => {
            op(
                a,
                Op::Rename {
                    from: p("e/a2"),
                    to: p("x"),
                },
            )?;
            op(
                a,
                Op::Rename {
                    from: p("e"),
                    to: p("d/e"),
                },
            )?;
            file(a, "e", b"e is a file now", 0o644)?;
            op(
                a,
                Op::Mkdir {
                    path: p("many"),
                    mode: 0o700,
                },
            )
        }
    }
}

const BATCHES: u64 = 4;

fn info(seq: u64) -> BatchInfo {
    BatchInfo {
        epoch: 1,
        seq,
        sealed_at_ns: seq * 1000,
        resync: false,
        base_epoch: if seq > 1 { 1 } else { 0 },
        base_seq: seq - 1,
    }
}

fn applied_of(seq: u64) -> (u64, u64) {
    (if seq > 0 { 1 } else { 0 }, seq)
}

/// Applies batches `from..=BATCHES` the way the replica does: commit, save
/// the state (here: `applied`), mark finished. Test-level crash points sit
/// between those.
fn drive(a: &mut Applier, applied: &mut u64, snaps: &mut Option<&mut Vec<Snapshot>>, root: &Path) {
    for i in (*applied + 1)..=BATCHES {
        a.begin(info(i)).unwrap();
        crash_batch(a, i).unwrap();
        a.commit().unwrap();
        crash("test-before-state-save");
        *applied = i;
        crash("test-before-finished");
        a.finished();
        if let Some(s) = snaps.as_mut() {
            s.push(snapshot(root));
        }
    }
}

#[test]
fn a_crash_at_any_point_recovers_to_a_batch_boundary() {
    // Quiet the expected crash panics; report any other.
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if info.payload().downcast_ref::<Crashed>().is_none() {
            default(info)
        }
    }));
    // Reference run: the tree after each batch, and how often each crash
    // point is reached.
    let mut f = fixture();
    let mut snaps = vec![snapshot(&f.root)];
    CRASH_SEEN.with(|s| s.borrow_mut().clear());
    let mut applied = 0;
    drive(&mut f.a, &mut applied, &mut Some(&mut snaps), &f.root);
    let seen: Vec<(String, u32)> = CRASH_SEEN.with(|s| {
        let mut v: Vec<_> = s.borrow().iter().map(|(k, v)| (k.clone(), *v)).collect();
        v.sort();
        v
    });
    let points = [
        "after-stage-write",
        "after-stage-sync",
        "journal-torn-trailer",
        "after-journal-commit",
        "after-step",
        "after-dir-sync",
        "test-before-state-save",
        "test-before-finished",
    ];
    for pt in points {
        assert!(
            seen.iter().any(|(k, n)| k == pt && *n > 0),
            "crash point {pt} never reached: {seen:?}"
        );
    }
    let mut crashes = 0;
    let mut redone = 0;
    for (pt, n) in &seen {
        for k in 1..=*n {
            let mut f = fixture();
            let mut applied = 0u64;
            CRASH_AT.with(|c| *c.borrow_mut() = Some((pt.clone(), k)));
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                drive(&mut f.a, &mut applied, &mut None, &f.root)
            }));
            assert!(r.is_err(), "{pt}#{k}: did not crash");
            assert!(CRASH_AT.with(|c| c.borrow().is_none()));
            crashes += 1;
            // the process is gone: a new one opens the root and recovers
            let Fixture { a, root, state, .. } = &mut f;
            drop(std::mem::replace(
                a,
                Applier::open(root, Some(p(".ferry")), state).unwrap(),
            ));
            clean_temp_files(root).unwrap();
            match a.recover(applied_of(applied)).unwrap() {
                Recovery::Clean => {}
                Recovery::Finished(i) => {
                    assert_eq!(i.seq, applied + 1, "{pt}#{k}");
                    applied = i.seq;
                    a.finished();
                    redone += 1;
                }
                Recovery::NeedsResync => panic!("{pt}#{k}: needs a resync"),
            }
            assert_eq!(
                snapshot(root),
                snaps[applied as usize],
                "{pt}#{k}: not at the boundary of batch {applied}"
            );
            no_temp_files(a, root);
            // and goes on from there
            drive(a, &mut applied, &mut None, root);
            assert_eq!(snapshot(root), snaps[BATCHES as usize], "{pt}#{k}: end");
        }
    }
    eprintln!("{crashes} crashes, {redone} batches finished by recovery");
    assert!(
        crashes >= 40 && redone > 0,
        "{crashes} crashes, {redone} redone"
    );
}

#[test]
fn compressed_data_must_decompress_to_its_announced_size() {
    let mut f = fixture();
    let raw = vec![b'a'; 100_000];
    let z = zstd::bulk::compress(&raw, 1).unwrap();
    assert!(z.len() < 1000);
    let hdr = |size: u64| FileHeader {
        path: p("z"),
        mode: 0o644,
        mtime: Mtime::default(),
        size,
    };
    f.begin();
    // a bomb: announced small, decompresses to more
    f.a.file_begin(&hdr(100)).unwrap();
    let r = f.a.file_data_compressed(100, &z);
    assert!(matches!(r, Err(ApplyError::BadStream { .. })), "{r:?}");
    // announced larger than it is
    f.a.file_begin(&hdr(200_000)).unwrap();
    let r = f.a.file_data_compressed(200_000, &z);
    assert!(matches!(r, Err(ApplyError::BadStream { .. })), "{r:?}");
    // garbage
    f.a.file_begin(&hdr(100)).unwrap();
    let r = f.a.file_data_compressed(100, b"not zstd at all");
    assert!(matches!(r, Err(ApplyError::BadStream { .. })), "{r:?}");
    // the real thing
    f.a.file_begin(&hdr(100_000)).unwrap();
    f.a.file_data_compressed(100_000, &z).unwrap();
    f.a.file_end(blake3::hash(&raw).as_bytes()).unwrap();
    f.a.commit().unwrap();
    assert_eq!(std::fs::read(f.root.join("z")).unwrap(), raw);
    no_temp_files(&f.a, &f.root);
}
