//! Test harness for process tests: real `ferry` binaries on loopback.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn ferry() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

pub fn free_port() -> u16 {
    // Both protocols must be free: QUIC (UDP) and metrics (TCP) use one each.
    loop {
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let p = u.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// A temp dir with a CA and per-node certificates.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(base: &Path, ca_name: &str) -> Pki {
        let dir = base.join(format!("pki-{ca_name}"));
        run_ok(&[
            "cert",
            "init",
            "--out",
            dir.join("ca").to_str().unwrap(),
            "--name",
            ca_name,
        ]);
        Pki { dir }
    }
    /// Issues a certificate for `name`; returns its TLS dir.
    pub fn issue(&self, name: &str) -> PathBuf {
        let out = self.dir.join(format!("tls-{name}"));
        if !out.exists() {
            run_ok(&[
                "cert",
                "issue",
                "--ca",
                self.dir.join("ca").to_str().unwrap(),
                "--name",
                name,
                "--out",
                out.to_str().unwrap(),
            ]);
        }
        out
    }
}

pub fn run_ok(args: &[&str]) -> String {
    let out = Command::new(ferry()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ferry {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ferry status ARGS`: its stdout; it must have reached a daemon (exit 0,
/// healthy, or 1, degraded; 2 is "down").
pub fn status_ok(args: &[&str]) -> String {
    let out = Command::new(ferry())
        .arg("status")
        .args(args)
        .output()
        .unwrap();
    assert!(
        matches!(out.status.code(), Some(0) | Some(1)),
        "ferry status {args:?} exited {:?}: {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One `ferry run` process.
pub struct Node {
    pub name: String,
    pub root: PathBuf,
    pub port: u16,
    pub metrics: u16,
    pub log: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    /// Another ferry binary than the one under test (an older release).
    bin: Option<PathBuf>,
}

impl Node {
    pub fn new(
        base: &Path,
        name: &str,
        tls: &Path,
        role: &str,
        peers: &[(&str, u16)],
        extra: &[&str],
    ) -> Node {
        let root = base.join(format!("root-{name}"));
        std::fs::create_dir_all(&root).unwrap();
        let port = free_port();
        let metrics = free_port();
        let mut args: Vec<String> = vec![
            "run".into(),
            "--root".into(),
            root.display().to_string(),
            "--name".into(),
            name.into(),
            "--tls-dir".into(),
            tls.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--role".into(),
            role.into(),
            "--metrics-addr".into(),
            format!("127.0.0.1:{metrics}"),
        ];
        for (n, p) in peers {
            args.push("--peer".into());
            args.push(format!("{n}=127.0.0.1:{p}"));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Node {
            name: name.into(),
            root,
            port,
            metrics,
            log: base.join(format!("{name}.log")),
            args,
            child: None,
            bin: None,
        }
    }

    /// Runs (and asks `status` of) another ferry binary, e.g. an older
    /// release; `None`: the one under test.
    pub fn set_binary(&mut self, bin: Option<&Path>) {
        self.bin = bin.map(Path::to_path_buf);
    }

    fn binary(&self) -> PathBuf {
        self.bin.clone().unwrap_or_else(|| PathBuf::from(ferry()))
    }

    /// Moves the node's root (before start), e.g. onto a test mount.
    pub fn set_root(&mut self, root: &Path) {
        let i = self.args.iter().position(|a| a == "--root").unwrap();
        self.args[i + 1] = root.display().to_string();
        self.root = root.to_path_buf();
    }

    /// Sets the peers after construction (ports are known only then).
    pub fn peer(&mut self, name: &str, port: u16) {
        self.args.push("--peer".into());
        self.args.push(format!("{name}=127.0.0.1:{port}"));
    }

    pub fn start(&mut self) -> &mut Self {
        self.start_wrapped(&[])
    }

    /// Starts the node under a wrapper command (e.g. `unshare ... --`): the
    /// wrapper's argv, then the ferry binary and its arguments.
    pub fn start_wrapped(&mut self, wrapper: &[&str]) -> &mut Self {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = match wrapper.split_first() {
            None => Command::new(self.binary()),
            Some((w, rest)) => {
                let mut c = Command::new(w);
                c.args(rest).arg(self.binary());
                c
            }
        };
        let child = cmd
            .args(&self.args)
            .env("FERRY_LOG_LEVEL", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self
    }

    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("{} exited early with {st}:\n{}", self.name, self.log_tail());
                }
            }
            if http_get(self.metrics, "/readyz").is_some_and(|(code, _)| code == 200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{} not ready within {timeout:?}:\n{}",
            self.name,
            self.log_tail()
        );
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        unsafe_free_kill(c.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `ferry status --json` of this node.
    pub fn status_json(&self) -> String {
        let out = Command::new(self.binary())
            .args(["status", "--json", "--root"])
            .arg(&self.root)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn metric(&self, name: &str) -> f64 {
        metric(self.metrics, name)
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn unsafe_free_kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Minimal HTTP/1.0 GET on loopback: (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// Sum of all samples of a metric family (any labels); 0 when absent.
pub fn metric(port: u16, name: &str) -> f64 {
    let Some((_, body)) = http_get(port, "/metrics") else {
        return 0.0;
    };
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ') | Some(b'{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sum of a metric's samples whose labels contain `label` (e.g. `kind="x"`).
pub fn metric_labeled(port: u16, name: &str, label: &str) -> f64 {
    let Some((_, body)) = http_get(port, "/metrics") else {
        return 0.0;
    };
    body.lines()
        .filter(|l| {
            l.starts_with(name) && l.as_bytes().get(name.len()) == Some(&b'{') && l.contains(label)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[derive(Debug, PartialEq, Eq)]
pub enum Ent {
    File {
        mode: u32,
        mtime: (i64, i64),
        hash: [u8; 32],
        len: u64,
    },
    Dir {
        mode: u32,
    },
    Link(PathBuf),
}

/// Everything below `root` except the top-level `.ferry` state dir.
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, Ent> {
    let mut out = BTreeMap::new();
    let walker = walkdir::WalkDir::new(root)
        .min_depth(1)
        .into_iter()
        .filter_entry(|e| !(e.depth() == 1 && e.file_name() == ".ferry"));
    for e in walker {
        let Ok(e) = e else { continue };
        let rel = e.path().strip_prefix(root).unwrap().to_path_buf();
        let Ok(md) = e.path().symlink_metadata() else {
            continue;
        };
        let ent = if md.file_type().is_symlink() {
            Ent::Link(std::fs::read_link(e.path()).unwrap_or_default())
        } else if md.is_dir() {
            Ent::Dir {
                mode: md.permissions().mode() & 0o7777,
            }
        } else {
            let data = std::fs::read(e.path()).unwrap_or_default();
            Ent::File {
                mode: md.permissions().mode() & 0o7777,
                mtime: (md.mtime(), md.mtime_nsec()),
                hash: *blake3::hash(&data).as_bytes(),
                len: data.len() as u64,
            }
        };
        out.insert(rel, ent);
    }
    out
}

/// First differences between two snapshots, for failure messages.
pub fn diff_summary(a: &BTreeMap<PathBuf, Ent>, b: &BTreeMap<PathBuf, Ent>) -> String {
    let mut out = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => out.push(format!("only on primary: {}", k.display())),
            Some(w) if w != v => out.push(format!("differs: {} {v:?} vs {w:?}", k.display())),
            _ => {}
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            out.push(format!("only on replica: {}", k.display()));
        }
    }
    let n = out.len();
    out.truncate(12);
    format!("{n} differences, first: \n  {}", out.join("\n  "))
}

/// Waits until `replica` equals `primary`; returns the time it took.
pub fn wait_converged(primary: &Path, replica: &Path, timeout: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let a = snapshot(primary);
        let b = snapshot(replica);
        if a == b {
            return t0.elapsed();
        }
        if t0.elapsed() > timeout {
            panic!(
                "{} did not converge to {} within {timeout:?}: {}",
                replica.display(),
                primary.display(),
                diff_summary(&a, &b)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Self-verifying file content: `FV1 <len> <blake3 hex>\n<payload>`.
pub fn sv_content(rng: &mut fastrand::Rng, len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..len).map(|_| rng.alphanumeric() as u8).collect();
    let mut v = format!("FV1 {} {}\n", len, blake3::hash(&payload).to_hex()).into_bytes();
    v.extend_from_slice(&payload);
    v
}

/// Checks a self-verifying file; `Err` describes a torn one.
pub fn sv_check(data: &[u8]) -> Result<(), String> {
    let nl = data
        .iter()
        .position(|b| *b == b'\n')
        .ok_or("no header line")?;
    let head = std::str::from_utf8(&data[..nl]).map_err(|_| "header not utf8")?;
    let mut it = head.split(' ');
    if it.next() != Some("FV1") {
        return Err(format!("bad magic in {head:?}"));
    }
    let len: usize = it.next().and_then(|x| x.parse().ok()).ok_or("bad len")?;
    let hash = it.next().ok_or("no hash")?;
    let payload = &data[nl + 1..];
    if payload.len() != len {
        return Err(format!(
            "payload {} bytes, header says {len}",
            payload.len()
        ));
    }
    if blake3::hash(payload).to_hex().as_str() != hash {
        return Err("payload does not match its hash".into());
    }
    Ok(())
}

pub fn seed() -> u64 {
    let s = std::env::var("FERRY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("seed: {s} (replay with FERRY_TEST_SEED={s})");
    s
}
pub mod faults;
pub mod workload;

/// Block-structured self-verifying content for files rewritten in place:
/// 4 KiB blocks, each starting with the BLAKE3 of its other 4064 bytes. An
/// in-place rewrite (truncate, then block-sized writes) only ever leaves
/// whole blocks, of one version or another; a read torn by a concurrent
/// write leaves a block that fails its hash.
pub const BLOCK: usize = 4096;

pub fn blk_content(rng: &mut fastrand::Rng, blocks: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(blocks * BLOCK);
    for _ in 0..blocks {
        let body: Vec<u8> = (0..BLOCK - 32).map(|_| rng.u8(..)).collect();
        v.extend_from_slice(blake3::hash(&body).as_bytes());
        v.extend_from_slice(&body);
    }
    v
}

pub fn blk_check(data: &[u8]) -> Result<(), String> {
    if !data.len().is_multiple_of(BLOCK) {
        return Err(format!(
            "{} bytes is not a whole number of blocks",
            data.len()
        ));
    }
    for (i, b) in data.chunks(BLOCK).enumerate() {
        if blake3::hash(&b[32..]).as_bytes() != &b[..32] {
            return Err(format!("block {i} is torn"));
        }
    }
    Ok(())
}

/// Waits until the primary has nothing in flight: everything sealed is acked
/// by every peer, twice in a row 200 ms apart.
pub fn wait_idle(primary: &Node, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut calm = 0;
    while calm < 2 {
        assert!(
            Instant::now() < deadline,
            "primary never went idle:\n{}",
            primary.log_tail()
        );
        let unacked = primary.metric("ferry_unacked_batches");
        let sealed = primary.metric("ferry_sealed_seq");
        let acked = metric_labeled(primary.metrics, "ferry_acked_seq", "peer=");
        if unacked == 0.0 && acked >= sealed {
            calm += 1;
        } else {
            calm = 0;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Reads self-verifying files of a replica while writes run (G3): returns
/// the torn ones; `checked` counts reads, `torn` failures.
pub fn g3_poller(
    root: &Path,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    checked: std::sync::Arc<std::sync::atomic::AtomicU64>,
    torn: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> std::thread::JoinHandle<Vec<String>> {
    let root = root.to_path_buf();
    std::thread::spawn(move || {
        let mut bad = Vec::new();
        let mut rng = fastrand::Rng::with_seed(7);
        let mut files = Vec::new();
        let mut refreshed = Instant::now() - Duration::from_secs(1);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if refreshed.elapsed() > Duration::from_millis(200) {
                files = walkdir::WalkDir::new(&root)
                    .into_iter()
                    .flatten()
                    .filter(|e| {
                        e.file_type().is_file() && e.path().extension().is_some_and(|x| x == "sv")
                    })
                    .map(|e| e.path().to_path_buf())
                    .collect();
                refreshed = Instant::now();
            }
            if files.is_empty() {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            std::thread::sleep(Duration::from_micros(500));
            let f = &files[rng.usize(..files.len())];
            if let Ok(data) = std::fs::read(f) {
                checked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let check = if f.extension().is_some_and(|x| x == "blk") {
                    blk_check(&data)
                } else {
                    sv_check(&data)
                };
                if let Err(e) = check {
                    torn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    bad.push(format!("{}: {e}", f.display()));
                }
            }
        }
        bad
    })
}
