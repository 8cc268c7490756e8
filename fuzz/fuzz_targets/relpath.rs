//! The one path rule (RelPath) and the symlink-target rule on arbitrary
//! bytes: never a panic; an accepted path is relative, normalised and
//! bounded; its parent, components and joins obey the same rule; every
//! well-formed link target is accepted verbatim; a target the
//! `--safe-links` rule accepts never climbs above the root.
#![no_main]

use ferry_proto::path::{MAX_NAME_LEN, MAX_PATH_LEN};
use ferry_proto::{check_link_target, link_stays_inside, RelPath};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // split: path | 0xFF | link target
    let (path, target) = match data.iter().position(|b| *b == 0xFF) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    let Ok(p) = RelPath::new(path.to_vec()) else {
        return;
    };
    let b = p.as_bytes();
    assert!(!b.is_empty() && b.len() <= MAX_PATH_LEN);
    assert!(b[0] != b'/' && !b.contains(&0));
    let mut depth = 0;
    for c in p.components() {
        assert!(!c.is_empty() && c != b"." && c != b".." && c.len() <= MAX_NAME_LEN);
        depth += 1;
    }
    assert_eq!(depth, p.depth());
    if let Some(parent) = p.parent() {
        assert!(p.starts_with(&parent));
        assert_eq!(parent.depth() + 1, p.depth());
        let rejoined = parent.join(p.file_name()).expect("parent/name is valid");
        assert_eq!(rejoined, p);
    }
    assert_eq!(
        check_link_target(target).is_ok(),
        !target.is_empty() && target.len() <= ferry_proto::path::MAX_LINK_LEN && !target.contains(&0)
    );
    if link_stays_inside(&p, target).is_ok() {
        assert!(!target.is_empty() && target[0] != b'/');
        // resolve lexically from the link's directory: never above the root
        // (and `..` only before the first name: after one, the name could be
        // a link and the kernel would climb from wherever it points)
        let mut level: i64 = p.depth() as i64 - 1;
        let mut named = false;
        for c in target.split(|b| *b == b'/') {
            match c {
                b"" | b"." => {}
                b".." => {
                    assert!(!named, "'..' after a name accepted");
                    level -= 1;
                    assert!(level >= 0, "target climbs above the root");
                }
                _ => {
                    named = true;
                    level += 1;
                }
            }
        }
    }
});
