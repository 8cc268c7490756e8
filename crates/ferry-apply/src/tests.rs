use super::*;
use ferry_proto::Mtime;
use std::os::unix::fs::MetadataExt;

fn p(s: &str) -> RelPath {
    RelPath::new(s).unwrap()
}

fn write(a: &mut Applier, path: &str, data: &[u8], mode: u32) -> Result<(), ApplyError> {
    a.file_begin(&FileHeader {
        path: p(path),
        mode,
        mtime: Mtime {
            secs: 1_600_000_000,
            nanos: 5,
        },
        size: data.len() as u64,
    })?;
    a.file_data(data)?;
    a.file_end(blake3::hash(data).as_bytes())?;
    a.flush_files()
}

struct Fixture {
    _d: tempfile::TempDir,
    root: std::path::PathBuf,
    outside: std::path::PathBuf,
    a: Applier,
}

fn fixture() -> Fixture {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    let outside = d.path().join("outside");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let a = Applier::open(&root, Some(p(".ferry"))).unwrap();
    Fixture {
        _d: d,
        root,
        outside,
        a,
    }
}

fn no_temp_files(root: &Path) {
    for e in walk(root).unwrap() {
        assert!(
            !e.file_name().unwrap().as_bytes().starts_with(TEMP_PREFIX),
            "temp file left: {e:?}"
        );
    }
}

#[test]
fn file_is_written_with_mode_and_mtime() {
    let mut f = fixture();
    write(&mut f.a, "d/e/file", b"hello", 0o640).unwrap();
    f.a.commit().unwrap();
    let md = std::fs::metadata(f.root.join("d/e/file")).unwrap();
    assert_eq!(std::fs::read(f.root.join("d/e/file")).unwrap(), b"hello");
    assert_eq!(md.mode() & 0o7777, 0o640);
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_600_000_000, 5));
    no_temp_files(&f.root);
}

#[test]
fn hash_or_size_mismatch_leaves_old_version() {
    let mut f = fixture();
    write(&mut f.a, "x", b"old", 0o644).unwrap();
    let h = FileHeader {
        path: p("x"),
        mode: 0o644,
        mtime: Mtime::default(),
        size: 3,
    };
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
    assert_eq!(std::fs::read(f.root.join("x")).unwrap(), b"old");
    no_temp_files(&f.root);
}

#[test]
fn symlink_on_replica_is_never_followed() {
    let mut f = fixture();
    std::os::unix::fs::symlink(&f.outside, f.root.join("evil")).unwrap();
    let r = write(&mut f.a, "evil/x", b"pwned", 0o644);
    assert!(matches!(r, Err(ApplyError::Inconsistent { .. })), "{r:?}");
    f.a.apply_op(&Op::Mkdir {
        path: p("evil/sub"),
        mode: 0o755,
    })
    .unwrap_err();
    f.a.apply_op(&Op::Rename {
        from: p("evil"),
        to: p("evil2"),
    })
    .unwrap();
    // deleting through a link removes nothing outside
    std::fs::write(f.outside.join("keep"), b"k").unwrap();
    std::os::unix::fs::symlink(&f.outside, f.root.join("evil3")).unwrap();
    f.a.apply_op(&Op::Delete {
        path: p("evil3/keep"),
    })
    .unwrap();
    f.a.apply_op(&Op::Delete { path: p("evil3") }).unwrap();
    assert!(f.outside.join("keep").exists());
    assert_eq!(std::fs::read_dir(&f.outside).unwrap().count(), 1);
    // SetMeta on a link does not chmod its target
    std::os::unix::fs::symlink(f.outside.join("keep"), f.root.join("l")).unwrap();
    let r = f.a.apply_op(&Op::SetMeta {
        path: p("l"),
        mode: 0o777,
        mtime: Mtime::default(),
    });
    assert!(r.is_err());
    assert_ne!(
        std::fs::metadata(f.outside.join("keep")).unwrap().mode() & 0o777,
        0o777
    );
}

#[test]
fn hostile_requests_refused() {
    let mut f = fixture();
    let r = f.a.apply_op(&Op::Symlink {
        path: p("l"),
        target: b"../../etc".to_vec(),
        mtime: Mtime::default(),
    });
    assert!(matches!(r, Err(ApplyError::Refused { .. })), "{r:?}");
    let r = f.a.apply_op(&Op::Symlink {
        path: p("l"),
        target: b"/etc".to_vec(),
        mtime: Mtime::default(),
    });
    assert!(matches!(r, Err(ApplyError::Refused { .. })), "{r:?}");
    let r = write(&mut f.a, "suid", b"x", 0o4755);
    assert!(matches!(r, Err(ApplyError::Refused { .. })), "{r:?}");
    let r = f.a.apply_op(&Op::Mkdir {
        path: p("d"),
        mode: 0o2755,
    });
    assert!(matches!(r, Err(ApplyError::Refused { .. })), "{r:?}");
    std::fs::create_dir_all(f.root.join(".ferry")).unwrap();
    std::fs::write(f.root.join(".ferry/state.a"), b"s").unwrap();
    let r = f.a.apply_op(&Op::Delete { path: p(".ferry") });
    assert!(matches!(r, Err(ApplyError::Refused { .. })), "{r:?}");
    let r = write(&mut f.a, ".ferry/state.a", b"x", 0o644);
    assert!(matches!(r, Err(ApplyError::Refused { .. })), "{r:?}");
    assert!(f.root.join(".ferry/state.a").exists());
    // a nested .ferry is ordinary data
    write(&mut f.a, "app/.ferry/x", b"ok", 0o644).unwrap();
    assert!(!f.root.join("suid").exists());
    assert_eq!(std::fs::read_dir(&f.outside).unwrap().count(), 0);
}

#[test]
fn renames_deletes_and_kind_changes() {
    let mut f = fixture();
    write(&mut f.a, "a/x", b"1", 0o644).unwrap();
    write(&mut f.a, "a/y/z", b"2", 0o644).unwrap();
    f.a.apply_op(&Op::Rename {
        from: p("a"),
        to: p("b"),
    })
    .unwrap();
    assert_eq!(std::fs::read(f.root.join("b/y/z")).unwrap(), b"2");
    assert!(!f.root.join("a").exists());
    // the cache must not send writes for a re-created `a` into `b`
    write(&mut f.a, "a/new", b"3", 0o644).unwrap();
    assert!(!f.root.join("b/new").exists());
    // a file replaces a directory, a directory replaces a file
    write(&mut f.a, "b", b"file now", 0o644).unwrap();
    assert_eq!(std::fs::read(f.root.join("b")).unwrap(), b"file now");
    f.a.apply_op(&Op::Mkdir {
        path: p("b"),
        mode: 0o700,
    })
    .unwrap();
    assert!(f.root.join("b").is_dir());
    // rename onto a non-empty directory replaces it
    f.a.apply_op(&Op::Rename {
        from: p("a"),
        to: p("b"),
    })
    .unwrap();
    assert!(f.root.join("b/new").exists());
    // a missing source is never guessed around, even with something at `to`
    let r = f.a.apply_op(&Op::Rename {
        from: p("a"),
        to: p("b"),
    });
    assert!(matches!(r, Err(ApplyError::Inconsistent { .. })), "{r:?}");
    let r = f.a.apply_op(&Op::Rename {
        from: p("q"),
        to: p("r"),
    });
    assert!(matches!(r, Err(ApplyError::Inconsistent { .. })));
    // a directory renamed over a file the batch deletes later: the file goes
    std::fs::create_dir_all(f.root.join("dirA")).unwrap();
    std::fs::write(f.root.join("dirA/in"), b"i").unwrap();
    std::fs::write(f.root.join("fileB"), b"stale").unwrap();
    f.a.apply_op(&Op::Rename {
        from: p("dirA"),
        to: p("fileB"),
    })
    .unwrap();
    assert!(f.root.join("fileB/in").exists());
    f.a.apply_op(&Op::Delete { path: p("fileB") }).unwrap();
    f.a.apply_op(&Op::Delete { path: p("b") }).unwrap();
    f.a.apply_op(&Op::Delete { path: p("b") }).unwrap();
    f.a.apply_op(&Op::Symlink {
        path: p("link"),
        target: b"x/./y".to_vec(),
        mtime: Mtime::default(),
    })
    .unwrap();
    assert_eq!(
        std::fs::read_link(f.root.join("link")).unwrap(),
        Path::new("x/./y")
    );
    f.a.commit().unwrap();
    let names: Vec<_> = std::fs::read_dir(&f.root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("link")]);
}

#[test]
fn staged_files_land_together_and_in_order() {
    let mut f = fixture();
    // many files: flushed with one syncfs, then renamed into place
    for i in 0..40 {
        f.a.file_begin(&FileHeader {
            path: p(&format!("d/f{i}")),
            mode: 0o644,
            mtime: Mtime::default(),
            size: 1,
        })
        .unwrap();
        f.a.file_data(b"x").unwrap();
        f.a.file_end(blake3::hash(b"x").as_bytes()).unwrap();
    }
    // not visible before they are durable
    assert!(!f.root.join("d/f0").exists());
    // an operation on a staged path sees it in place
    f.a.apply_op(&Op::Rename {
        from: p("d/f3"),
        to: p("d/g3"),
    })
    .unwrap();
    assert!(f.root.join("d/g3").exists() && f.root.join("d/f39").exists());
    // the same path twice in a batch: the later version wins
    for v in [b"1", b"2"] {
        f.a.file_begin(&FileHeader {
            path: p("twice"),
            mode: 0o644,
            mtime: Mtime::default(),
            size: 1,
        })
        .unwrap();
        f.a.file_data(v).unwrap();
        f.a.file_end(blake3::hash(v).as_bytes()).unwrap();
    }
    let stats = f.a.commit().unwrap();
    assert_eq!(stats.files, 42);
    assert_eq!(std::fs::read(f.root.join("twice")).unwrap(), b"2");
    no_temp_files(&f.root);
    // a reset drops staged files without leaving temp files behind
    f.a.file_begin(&FileHeader {
        path: p("dropped"),
        mode: 0o644,
        mtime: Mtime::default(),
        size: 1,
    })
    .unwrap();
    f.a.file_data(b"x").unwrap();
    f.a.file_end(blake3::hash(b"x").as_bytes()).unwrap();
    f.a.reset();
    assert!(!f.root.join("dropped").exists());
    no_temp_files(&f.root);
}

#[test]
fn no_space_is_reported_as_such() {
    let e = io_err("write", &p("x"), io::Error::from_raw_os_error(28));
    assert!(matches!(e, ApplyError::NoSpace { .. }));
    assert!(e.to_string().contains("no space"));
}

#[test]
fn append_extends_in_place_or_refuses_a_different_base() {
    let mut f = fixture();
    write(&mut f.a, "log", b"hello", 0o644).unwrap();
    f.a.commit().unwrap();
    let prev = Mtime {
        secs: 1_600_000_000,
        nanos: 5,
    };
    let ino = std::fs::metadata(f.root.join("log")).unwrap().ino();
    let hdr = |offset: u64, prev_mtime: Mtime, size: u64| ferry_proto::AppendHeader {
        path: p("log"),
        offset,
        prev_mtime,
        size,
        mode: 0o600,
        mtime: Mtime {
            secs: 1_700_000_000,
            nanos: 0,
        },
    };
    // a wrong base (size or mtime) writes nothing
    let r = f.a.append_begin(&hdr(4, prev, 9));
    assert!(matches!(r, Err(ApplyError::Inconsistent { .. })), "{r:?}");
    let r = f.a.append_begin(&hdr(5, Mtime::default(), 9));
    assert!(matches!(r, Err(ApplyError::Inconsistent { .. })), "{r:?}");
    // an aborted append leaves the old version, mtime included
    f.a.append_begin(&hdr(5, prev, 11)).unwrap();
    f.a.file_data(b" wor").unwrap();
    f.a.file_abort();
    assert_eq!(std::fs::read(f.root.join("log")).unwrap(), b"hello");
    let md = std::fs::metadata(f.root.join("log")).unwrap();
    assert_eq!((md.mtime(), md.mtime_nsec()), (prev.secs, 5));
    // a tail that does not match its hash is undone too
    f.a.append_begin(&hdr(5, prev, 11)).unwrap();
    f.a.file_data(b" world").unwrap();
    assert!(f.a.file_end(&[0; 32]).is_err());
    assert_eq!(std::fs::read(f.root.join("log")).unwrap(), b"hello");
    // the real thing: extended in place (same inode), new mode and mtime
    f.a.append_begin(&hdr(5, prev, 11)).unwrap();
    f.a.file_data(b" world").unwrap();
    f.a.file_end(blake3::hash(b" world").as_bytes()).unwrap();
    let st = f.a.commit().unwrap();
    assert_eq!(st.bytes, 6);
    assert_eq!(std::fs::read(f.root.join("log")).unwrap(), b"hello world");
    let md = std::fs::metadata(f.root.join("log")).unwrap();
    assert_eq!(md.ino(), ino, "appended in place, not copied");
    assert_eq!(md.mode() & 0o777, 0o600);
    assert_eq!(md.mtime(), 1_700_000_000);
    no_temp_files(&f.root);
}
