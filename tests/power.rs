//! Power cuts (issue 19; G2, G3, G4): ferry in a virtual machine whose power
//! is cut at random moments. A process kill keeps the kernel's page cache, so
//! a missing fsync or a wrong order of fsync and rename never shows in
//! tests/crash.rs; here qemu is killed, and what the guest kernel had not yet
//! written to its virtual disk is lost, as in a real power cut.
//!
//! - `power_cut_replica_in_vm`: the replica runs in the guest, the primary on
//!   the host under a self-verifying write load. After each cut the guest's
//!   disk is read on the host (journal replayed, as a boot would), before
//!   ferry's own recovery: no torn file, immutable files equal the primary's,
//!   logs are prefixes of the primary's, everything present at the last
//!   barrier (primary idle, all acknowledged) is there; after a quiet cut the
//!   tree equals the primary's exactly. After the next boot the replica is
//!   ready (it finished any committed batch from its redo journal, the
//!   machine-crash branch) at an applied seq no lower than the primary saw
//!   acknowledged before the cut.
//! - `power_cut_primary_in_vm`: the primary and its app (a busybox writer that
//!   reports each fsync it completed) run in the guest, the replica on the
//!   host. After each cut the guest's disk must hold everything the app made
//!   durable, and after the next boot, before the app writes again, the
//!   replica must become exactly that disk's tree: what was fsynced is
//!   shipped, and the primary's file index vouches for nothing that did not
//!   survive the cut.
//!
//! 10 cuts each in the test command; `FERRY_POWER_CUTS=N` sets the count
//! (the soak: 200). `FERRY_TEST_SEED` replays a run's random choices.
//! Needs root (loop mounts), qemu-system-x86 and busybox-static.

#[path = "support/mod.rs"]
mod support;
#[path = "power/vm.rs"]
mod vm;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;
use vm::{Boot, Image, Kit, Vm};

/// The test's directory, kept when the test fails (its consoles and disk
/// image are the evidence) and removed when it passes.
struct TestDir(PathBuf);

impl TestDir {
    fn new() -> TestDir {
        TestDir(
            tempfile::Builder::new()
                .prefix("ferry-power-")
                .tempdir()
                .unwrap()
                .keep(),
        )
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept for inspection: {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn cuts() -> usize {
    std::env::var("FERRY_POWER_CUTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
}

/// Under TCG the guest is slow; every wait on it is bounded by this.
const GUEST_WAIT: Duration = Duration::from_secs(180);

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

// ---------------------------------------------------------------------------
// The replica in the guest

/// What the host-side app has written, for the checks after a cut.
#[derive(Clone, Default)]
struct Written {
    /// Immutable files (written once, never changed until deleted).
    imm: BTreeSet<String>,
    /// Every version (BLAKE3) each replaced file has had, in order.
    mut_versions: BTreeMap<String, Vec<[u8; 32]>>,
    /// Current length of each append-only log.
    logs: BTreeMap<String, u64>,
    /// Immutable files deleted since the start (to bound the disk).
    deleted: BTreeSet<String>,
}

/// The primary's app: creates self-verifying files (temp + rename),
/// replaces a few files again and again, appends to logs, deletes the oldest
/// files when the tree grows past a budget.
struct App {
    root: PathBuf,
    rng: fastrand::Rng,
    next: u64,
    bytes: u64,
    order: std::collections::VecDeque<(String, u64)>,
    w: Written,
}

impl App {
    fn new(root: &Path, seed: u64) -> App {
        for d in ["imm", "mut", "log"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        App {
            root: root.to_path_buf(),
            rng: fastrand::Rng::with_seed(seed),
            next: 0,
            bytes: 0,
            order: Default::default(),
            w: Written::default(),
        }
    }

    fn put(&self, rel: &str, data: &[u8]) {
        let tmp = self.root.join(format!("{rel}.tmp"));
        std::fs::write(&tmp, data).unwrap();
        std::fs::rename(&tmp, self.root.join(rel)).unwrap();
    }

    fn step(&mut self) {
        match self.rng.u8(..10) {
            0..=5 => {
                self.next += 1;
                let len = if self.rng.u8(..20) == 0 {
                    self.rng.usize(1 << 20..2 << 20)
                } else {
                    self.rng.usize(100..96 << 10)
                };
                let rel = format!("imm/i{}.sv", self.next);
                let data = sv_content(&mut self.rng, len);
                self.put(&rel, &data);
                self.bytes += data.len() as u64;
                self.order.push_back((rel.clone(), data.len() as u64));
                self.w.imm.insert(rel);
                // keep the tree (and the guest's disk) bounded
                while self.bytes > 96 << 20 {
                    let (old, n) = self.order.pop_front().unwrap();
                    std::fs::remove_file(self.root.join(&old)).unwrap();
                    self.bytes -= n;
                    self.w.imm.remove(&old);
                    self.w.deleted.insert(old);
                }
            }
            6..=7 => {
                let rel = format!("mut/m{}.sv", self.rng.u8(..6));
                let len = self.rng.usize(100..32 << 10);
                let data = sv_content(&mut self.rng, len);
                self.put(&rel, &data);
                self.w
                    .mut_versions
                    .entry(rel)
                    .or_default()
                    .push(*blake3::hash(&data).as_bytes());
            }
            _ => {
                // one append per write(), to the newest log; a new log every 4 MiB
                let n = self.w.logs.len().max(1);
                let mut rel = format!("log/l{n}.app");
                if self.w.logs.get(&rel).is_some_and(|l| *l > 4 << 20) {
                    rel = format!("log/l{}.app", n + 1);
                }
                let chunk: Vec<u8> = (0..self.rng.usize(1..64 << 10))
                    .map(|_| self.rng.u8(..))
                    .collect();
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.root.join(&rel))
                    .unwrap();
                f.write_all(&chunk).unwrap();
                *self.w.logs.entry(rel).or_default() += chunk.len() as u64;
            }
        }
    }
}

/// Checks the replica's tree as the cut left it (before ferry's recovery)
/// against the primary's; returns the number of files checked.
fn check_after_cut(
    replica: &Path,
    primary: &Path,
    now: &Written,
    barrier: &Written,
) -> Result<usize, String> {
    let mut checked = 0;
    let mut errors = Vec::new();
    for e in walkdir::WalkDir::new(replica).min_depth(1) {
        let e = e.map_err(|e| e.to_string())?;
        let rel = e.path().strip_prefix(replica).unwrap();
        if rel.starts_with(".ferry") || !e.file_type().is_file() {
            continue;
        }
        let name = rel.to_string_lossy().into_owned();
        let data = std::fs::read(e.path()).map_err(|e| format!("{name}: {e}"))?;
        checked += 1;
        if name.ends_with(".sv") {
            if let Err(why) = sv_check(&data) {
                errors.push(format!("torn: {name}: {why}"));
                continue;
            }
        }
        if name.starts_with("imm/") && name.ends_with(".sv") {
            if let Ok(p) = std::fs::read(primary.join(rel)) {
                if p != data {
                    errors.push(format!("{name} differs from the primary's (immutable)"));
                }
            }
        } else if name.starts_with("mut/") && name.ends_with(".sv") {
            let h = *blake3::hash(&data).as_bytes();
            let all = now.mut_versions.get(&name).cloned().unwrap_or_default();
            let floor = barrier.mut_versions.get(&name).map_or(0, |v| v.len() - 1);
            match all.iter().position(|x| *x == h) {
                None => errors.push(format!("{name}: a version the primary never had")),
                Some(i) if i < floor => errors.push(format!(
                    "{name}: version {i}, older than version {floor} acknowledged at the barrier"
                )),
                _ => {}
            }
        } else if name.starts_with("log/") && name.ends_with(".app") {
            if let Ok(p) = std::fs::read(primary.join(rel)) {
                if !p.starts_with(&data) {
                    errors.push(format!(
                        "{name}: {} bytes, not a prefix of the primary's {}",
                        data.len(),
                        p.len()
                    ));
                }
            }
        }
    }
    for f in &barrier.imm {
        if !now.deleted.contains(f) && !replica.join(f).exists() {
            errors.push(format!(
                "{f}: acknowledged at the barrier, missing after the cut"
            ));
        }
    }
    for (f, len) in &barrier.logs {
        let have = std::fs::metadata(replica.join(f)).map_or(0, |m| m.len());
        if have < *len {
            errors.push(format!(
                "{f}: {have} bytes after the cut, {len} acknowledged at the barrier"
            ));
        }
    }
    if errors.is_empty() {
        Ok(checked)
    } else {
        let n = errors.len();
        errors.truncate(12);
        Err(format!("{n} problems:\n  {}", errors.join("\n  ")))
    }
}

fn acked(primary: &Node) -> f64 {
    metric_labeled(primary.metrics, "ferry_acked_seq", "peer=\"replica\"")
}

#[test]
fn power_cut_replica_in_vm() {
    assert!(
        faults::is_root(),
        "the power-cut tests mount the guest's disk: run them as root"
    );
    let seed = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let cuts = cuts();
    let tmp = TestDir::new();
    let base = tmp.path();
    eprintln!("test dir: {} (guest: {})", base.display(), vm::accel());
    let kit = Kit::build(&base.join("kit"));
    let pki = Pki::new(base, "ca-power");
    let initrd = kit.initrd(&pki.issue("replica"), &base.join("initrd-replica"));
    let image = Image::create(&base.join("replica.img"), 1 << 30);
    let quic_fwd = free_port();
    let metrics_fwd = free_port();
    let mut primary = Node::new(
        base,
        "primary",
        &pki.issue("primary"),
        "primary",
        &[("replica", quic_fwd)],
        &[],
    );
    primary.start().wait_ready(Duration::from_secs(30));

    let app = Arc::new(Mutex::new(App::new(&primary.root, seed)));
    let mnt = base.join("mnt");
    let mut recovery = Vec::new();
    let mut acked_before = 0.0;
    let (mut quiet_cuts, mut busy_cuts, mut files_checked, mut recovered) = (0, 0, 0, 0.0);
    for cut in 0..=cuts {
        let boot = Boot {
            kit: &kit,
            initrd: &initrd,
            image: &image,
            mode: "replica",
            peer_port: primary.port,
            quic_fwd,
            metrics_fwd,
            go_port: 0,
            console: base.join(format!("console-{cut}.log")),
            writer_log: base.join(format!("ttyS1-{cut}.log")),
        };
        let mut guest = Vm::boot(&boot);
        let ready = guest.wait_ready(GUEST_WAIT);
        let applied = guest.metric("ferry_applied_seq");
        recovered += guest.metric("ferry_batches_recovered_total");
        assert!(
            applied >= acked_before,
            "cut {cut}: the primary saw batch {acked_before} acknowledged before the cut, \
             the replica restarted at {applied} (an acknowledged batch was lost); console:\n{}",
            guest.console_tail()
        );
        recovery.push(ready);
        if cut == cuts {
            // the last boot: converge, then one more quiet cut to compare
            wait_idle(&primary, GUEST_WAIT);
            guest.cut();
            let m = image.mount(&mnt);
            let (a, b) = (snapshot(&primary.root), snapshot(&m.at.join("root")));
            assert!(
                a == b,
                "after the last boot the replica did not converge: {}",
                diff_summary(&a, &b)
            );
            break;
        }

        // load, then a barrier: the app pauses until everything is acknowledged
        let until = Instant::now() + Duration::from_millis(rng.u64(300..2500));
        while Instant::now() < until {
            app.lock().unwrap().step();
        }
        wait_idle(&primary, GUEST_WAIT);
        let barrier = app.lock().unwrap().w.clone();
        let quiet = rng.u8(..3) == 0;
        if quiet {
            quiet_cuts += 1;
            guest.cut();
        } else {
            // the app writes on; the power goes at a random moment
            busy_cuts += 1;
            let stop = Arc::new(AtomicBool::new(false));
            let writer = {
                let (app, stop) = (app.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        app.lock().unwrap().step();
                    }
                })
            };
            std::thread::sleep(Duration::from_millis(rng.u64(0..3000)));
            guest.assert_running();
            guest.cut();
            stop.store(true, Ordering::Relaxed);
            writer.join().unwrap();
        }
        // every ack the primary got was sent before the cut
        acked_before = acked(&primary);
        let now = app.lock().unwrap().w.clone();
        let m = image.mount(&mnt);
        let root = m.at.join("root");
        if quiet {
            let (a, b) = (snapshot(&primary.root), snapshot(&root));
            assert!(
                a == b,
                "cut {cut} (quiet, everything acknowledged): the replica's disk differs from \
                 the primary: {}",
                diff_summary(&a, &b)
            );
            files_checked += b.len();
        } else {
            match check_after_cut(&root, &primary.root, &now, &barrier) {
                Ok(n) => files_checked += n,
                Err(e) => panic!("cut {cut}: {e}"),
            }
        }
        drop(m);
        eprintln!(
            "cut {cut}: {} cut, ready {:.1}s after boot, applied {applied}, acknowledged {acked_before}",
            if quiet { "quiet" } else { "busy" },
            ready.as_secs_f64()
        );
    }
    let med = median(&mut recovery);
    let max = recovery.iter().max().copied().unwrap_or_default();
    eprintln!(
        "power (replica in the guest): {cuts} cuts ({busy_cuts} under load, {quiet_cuts} quiet), \
         0 acknowledged batches lost, 0 torn; {files_checked} files checked after the cuts; \
         {recovered} batches finished from the redo journal after a boot; boot to ready: \
         median {:.1}s, max {:.1}s ({} guest)",
        med.as_secs_f64(),
        max.as_secs_f64(),
        vm::accel()
    );
}

// ---------------------------------------------------------------------------
// The primary in the guest

/// The largest value of a numeric field in the JSON log lines of `log`.
fn json_field(log: &str, field: &str) -> u64 {
    let key = format!("\"{field}\":");
    log.lines()
        .filter_map(|l| {
            let rest = &l[l.find(&key)? + key.len()..];
            let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            digits.parse().ok()
        })
        .max()
        .unwrap_or(0)
}

/// The content tests/power/writer.sh gives NAME at LEN: "PW NAME LEN\n" then
/// "NAME\n" repeated, cut to LEN bytes.
fn pw_content(name: &str, len: usize) -> Vec<u8> {
    let mut v = format!("PW {name} {len}\n").into_bytes();
    let unit = format!("{name}\n");
    let body: Vec<u8> = unit.bytes().cycle().take(len).collect();
    v.extend_from_slice(&body);
    v
}

/// What the guest's app reported durable before the cut.
#[derive(Default)]
struct Durable {
    imm: BTreeMap<String, usize>,
    /// replaced file -> highest version made durable
    mut_version: BTreeMap<String, u64>,
    log: u64,
    started: bool,
}

fn parse_writer_log(path: &Path) -> Durable {
    let raw = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&raw);
    let mut d = Durable::default();
    // only whole lines: the cut may have stopped the last one midway
    let whole = match text.rfind('\n') {
        Some(i) => &text[..i],
        None => "",
    };
    for line in whole.lines() {
        let w: Vec<&str> = line.trim_end_matches('\r').split(' ').collect();
        match w.as_slice() {
            ["WRITER", "started"] => d.started = true,
            ["DURABLE", name, len] if name.starts_with("imm/") => {
                d.imm.insert(name.to_string(), len.parse().unwrap());
            }
            ["DURABLE", name, _] if name.starts_with("mut/") => {
                // mut/mK.vN
                let (file, v) = name.rsplit_once(".v").unwrap();
                let v: u64 = v.parse().unwrap();
                let e = d.mut_version.entry(file.to_string()).or_default();
                *e = (*e).max(v);
            }
            ["DURABLE-LOG", n] => d.log = n.parse().unwrap(),
            _ => {}
        }
    }
    d
}

/// The guest's disk after a cut holds everything its app made durable.
fn check_durable(root: &Path, d: &Durable) -> Result<(), String> {
    let mut errors = Vec::new();
    for (name, len) in &d.imm {
        match std::fs::read(root.join(name)) {
            Ok(data) if data == pw_content(name, *len) => {}
            Ok(data) => errors.push(format!(
                "{name}: {} bytes, not what was fsynced",
                data.len()
            )),
            Err(e) => errors.push(format!("{name}: fsynced, then {e}")),
        }
    }
    for (file, v) in &d.mut_version {
        let data = std::fs::read(root.join(file)).map_err(|e| format!("{file}: {e}"))?;
        let head = String::from_utf8_lossy(&data[..data.len().min(64)]).into_owned();
        let name = head
            .strip_prefix("PW ")
            .and_then(|h| h.split(' ').next())
            .unwrap_or("");
        let have: u64 = name
            .rsplit_once(".v")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        if data != pw_content(name, 3000) || have < *v {
            errors.push(format!(
                "{file}: holds {name:?}, version {v} was made durable"
            ));
        }
    }
    let log = std::fs::metadata(root.join("log")).map_or(0, |m| m.len());
    if log < d.log {
        errors.push(format!("log: {log} bytes, {} were fsynced", d.log));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n  "))
    }
}

/// Waits until the replica's tree equals `want`; says whether it differed
/// at first (the restarted primary had something to repair).
fn wait_equal(replica: &Path, want: &BTreeMap<PathBuf, Ent>, guest: &mut Vm, what: &str) -> bool {
    let t0 = Instant::now();
    let mut differed = false;
    loop {
        let have = snapshot(replica);
        if &have == want {
            return differed;
        }
        differed = true;
        guest.assert_running();
        assert!(
            t0.elapsed() < GUEST_WAIT,
            "{what}: the replica did not become the primary's disk within {GUEST_WAIT:?}: {}\n\
             console:\n{}",
            diff_summary(want, &have),
            guest.console_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn power_cut_primary_in_vm() {
    assert!(
        faults::is_root(),
        "the power-cut tests mount the guest's disk: run them as root"
    );
    let seed = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let cuts = cuts();
    let tmp = TestDir::new();
    let base = tmp.path();
    eprintln!("test dir: {} (guest: {})", base.display(), vm::accel());
    let kit = Kit::build(&base.join("kit"));
    let pki = Pki::new(base, "ca-power");
    let initrd = kit.initrd(&pki.issue("primary"), &base.join("initrd-primary"));
    let image = Image::create(&base.join("primary.img"), 1 << 30);
    let quic_fwd = free_port();
    let metrics_fwd = free_port();
    let go = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let go_port = go.local_addr().unwrap().port();
    let mut replica = Node::new(
        base,
        "replica",
        &pki.issue("replica"),
        "replica",
        &[("primary", quic_fwd)],
        &[],
    );
    replica.start();

    let mnt = base.join("mnt");
    let mut want: BTreeMap<PathBuf, Ent> = BTreeMap::new();
    let mut converge = Vec::new();
    let mut applied_before = 0.0;
    let (mut durable_files, mut repaired, mut reboot_rule) = (0, 0, 0);
    for cut in 0..=cuts {
        let boot = Boot {
            kit: &kit,
            initrd: &initrd,
            image: &image,
            mode: "primary",
            peer_port: replica.port,
            quic_fwd,
            metrics_fwd,
            go_port,
            console: base.join(format!("console-{cut}.log")),
            writer_log: base.join(format!("ttyS1-{cut}.log")),
        };
        let mut guest = Vm::boot(&boot);
        // before its app writes again, the restarted primary must make the
        // replica exactly what its disk holds after the cut
        if wait_equal(
            &replica.root,
            &want,
            &mut guest,
            &format!("after cut {cut}"),
        ) {
            repaired += 1;
        }
        converge.push(guest.started.elapsed());
        // how often the reboot rule of the file index (or of the first
        // resync without one) had to ship a file whose stat looked unchanged
        let console =
            String::from_utf8_lossy(&std::fs::read(&boot.console).unwrap_or_default()).into_owned();
        if console.contains("whose bytes may differ") || json_field(&console, "suspects") > 0 {
            reboot_rule += 1;
        }
        let applied = replica.metric("ferry_applied_seq");
        if cut == cuts {
            break;
        }
        // the go signal: the writer in the guest starts now
        go.set_nonblocking(false).unwrap();
        let (mut s, _) = go.accept().unwrap();
        s.write_all(b"go").unwrap();
        drop(s);
        std::thread::sleep(Duration::from_millis(rng.u64(500..4000)));
        guest.assert_running();
        guest.cut();
        let d = parse_writer_log(&boot.writer_log);
        assert!(
            d.started,
            "cut {cut}: the guest's writer never started; console:\n{}",
            guest.console_tail()
        );
        durable_files += d.imm.len();
        let m = image.mount(&mnt);
        let root = m.at.join("root");
        if let Err(e) = check_durable(&root, &d) {
            panic!("cut {cut}: what the app fsynced in the guest is not on its disk:\n  {e}");
        }
        want = snapshot(&root);
        drop(m);
        let now = replica.metric("ferry_applied_seq");
        assert!(
            now >= applied_before && now >= applied,
            "cut {cut}: the replica's applied seq went back"
        );
        applied_before = now;
        eprintln!(
            "cut {cut}: {} durable writes reported, disk holds {} entries, replica at seq {now}",
            d.imm.len(),
            want.len()
        );
    }
    let med = median(&mut converge);
    let max = converge.iter().max().copied().unwrap_or_default();
    eprintln!(
        "power (primary in the guest): {cuts} cuts, 0 acknowledged batches lost, 0 torn, \
         {durable_files} fsynced files found after the cuts; the replica equalled the cut disk \
         after every boot ({repaired} times the replica differed from it at first; {reboot_rule} times \
         the primary shipped files whose stat looked unchanged because the machine had \
         restarted): boot to equal median {:.1}s, max {:.1}s ({} guest)",
        med.as_secs_f64(),
        max.as_secs_f64(),
        vm::accel()
    );
}
