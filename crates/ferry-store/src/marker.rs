//! Small durable records beside the node state: where an epoch began
//! (`epoch.base`) and a demotion (`demoted`). One line of numbers each,
//! written to a temp file, fsynced and renamed, then the dir fsynced: a
//! record is either the old one or the new one, never torn.

use std::io::{self, Write};
use std::path::Path;

/// The epoch this node leads began after batch (`base_epoch`, `base_seq`),
/// sealed at `base_sealed_at_ns`.
pub const EPOCH_BASE: &str = "epoch.base";
/// This node was primary of `epoch` up to `seq` and was demoted at
/// `at_ns`; its next resync preserves its unreplicated writes.
pub const DEMOTED: &str = "demoted";
/// On a replica: the epoch it follows and (a hash of) the name of the
/// primary that owns it: a second primary claiming the same epoch is refused.
pub const EPOCH_OWNER: &str = "epoch.owner";

pub fn save(dir: &Path, name: &str, vals: &[u64]) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let line: Vec<String> = vals.iter().map(|v| v.to_string()).collect();
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(format!("{}\n", line.join(" ")).as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

/// The numbers of a record; `None` when absent or unreadable.
pub fn load(dir: &Path, name: &str) -> Option<Vec<u64>> {
    let s = std::fs::read_to_string(dir.join(name)).ok()?;
    s.split_whitespace().map(|x| x.parse().ok()).collect()
}

pub fn remove(dir: &Path, name: &str) -> io::Result<()> {
    match std::fs::remove_file(dir.join(name)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(()) => std::fs::File::open(dir)?.sync_all(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn save_load_remove() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(super::load(d.path(), "x"), None);
        super::save(d.path(), "x", &[1, 2, 3]).unwrap();
        assert_eq!(super::load(d.path(), "x"), Some(vec![1, 2, 3]));
        super::save(d.path(), "x", &[4]).unwrap();
        assert_eq!(super::load(d.path(), "x"), Some(vec![4]));
        super::remove(d.path(), "x").unwrap();
        super::remove(d.path(), "x").unwrap();
        assert_eq!(super::load(d.path(), "x"), None);
    }
}
