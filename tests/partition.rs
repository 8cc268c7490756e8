//! Partitions (issue 3): a primary and a replica in two network namespaces
//! joined by a veth pair; `tc netem` adds delay and loss, then cuts the link
//! entirely for a while as writes go on, then heals it. The replica must
//! converge, and the primary's memory must stay bounded during the cut.
//!
//! Needs root (namespaces, veth, tc); skipped with a message otherwise. On
//! a kernel without sch_netem the delay and loss are a 20 Mbit/s token
//! bucket (up to 50 ms of queueing) and a 1 % nftables random drop, and the
//! cut is an nftables drop-all; the test prints which it used.
//! The cut lasts 15 s in the suite; FERRY_SOAK=1 makes it 60 s.

#[path = "support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::faults::*;
use support::*;

/// Peak resident memory allowed for the primary while the link is cut. The
/// in-memory log, the per-peer in-flight window and quinn's windows are all
/// bounded; a leak per batch or per write would cross this within the cut.
const RSS_BOUND_KIB: u64 = 128 * 1024;

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Two namespaces and a veth pair, named uniquely for this run; all of it
/// is deleted on drop (deleting a namespace deletes its end of the pair).
struct Net {
    ns: [String; 2],
    dev: [String; 2],
    ip: [&'static str; 2],
    /// Whether the kernel has netem (known after the first `impair`).
    netem: Option<bool>,
}

impl Net {
    fn new() -> Result<Net, String> {
        // unique per run: the process id and the clock's microseconds
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_micros())
            .unwrap_or(0);
        let tag = format!("{:x}{:03x}", std::process::id() % 0xffff, micros % 0xfff);
        let net = Net {
            ns: [format!("ferry-{tag}-p"), format!("ferry-{tag}-r")],
            dev: [format!("fv{tag}p"), format!("fv{tag}r")],
            ip: ["10.77.0.1", "10.77.0.2"],
            netem: None,
        };
        for ns in &net.ns {
            sh(&["ip", "netns", "add", ns])?;
        }
        sh(&[
            "ip",
            "link",
            "add",
            &net.dev[0],
            "netns",
            &net.ns[0],
            "type",
            "veth",
            "peer",
            "name",
            &net.dev[1],
            "netns",
            &net.ns[1],
        ])?;
        for i in 0..2 {
            net.exec(
                i,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("{}/24", net.ip[i]),
                    "dev",
                    &net.dev[i],
                ],
            )?;
            net.exec(i, &["ip", "link", "set", &net.dev[i], "up"])?;
            net.exec(i, &["ip", "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    fn exec(&self, i: usize, args: &[&str]) -> Result<(), String> {
        let mut a = vec!["ip", "netns", "exec", &self.ns[i]];
        a.extend_from_slice(args);
        sh(&a)
    }

    /// Delay and loss on both ends: `tc netem delay 50ms loss 1%`; on a
    /// kernel without netem (sch_netem not built), a 20 Mbit/s token bucket
    /// (queueing delay up to 50 ms) plus 1 % random drop by nftables.
    fn impair(&mut self) -> Result<&'static str, String> {
        if self.netem.is_none() {
            let ok = self.qdisc(0, "netem delay 50ms loss 1%").is_ok();
            self.netem = Some(ok);
            if !ok {
                for i in 0..2 {
                    self.exec(i, &["nft", "add table inet ferrytest"])?;
                    self.exec(
                        i,
                        &[
                            "nft",
                            "add chain inet ferrytest out { type filter hook output priority 0; policy accept; }",
                        ],
                    )?;
                }
            }
        }
        if self.netem == Some(true) {
            for i in 0..2 {
                self.qdisc(i, "netem delay 50ms loss 1%")?;
            }
            Ok("netem delay 50ms loss 1%")
        } else {
            for i in 0..2 {
                self.qdisc(i, "tbf rate 20mbit burst 64kb latency 50ms")?;
                self.exec(i, &["nft", "flush chain inet ferrytest out"])?;
                self.exec(
                    i,
                    &[
                        "nft",
                        "add rule inet ferrytest out numgen random mod 100 < 1 drop",
                    ],
                )?;
            }
            Ok("no netem in this kernel: tbf 20mbit latency 50ms + nftables 1% random drop")
        }
    }

    /// Cuts the link: netem `loss 100%`, or an nftables drop-all.
    fn cut(&self) -> Result<(), String> {
        for i in 0..2 {
            if self.netem == Some(true) {
                self.qdisc(i, "netem loss 100%")?;
            } else {
                self.exec(i, &["nft", "flush chain inet ferrytest out"])?;
                self.exec(i, &["nft", "add rule inet ferrytest out drop"])?;
            }
        }
        Ok(())
    }

    fn qdisc(&self, i: usize, spec: &str) -> Result<(), String> {
        let mut a = vec!["tc", "qdisc", "replace", "dev", &self.dev[i], "root"];
        a.extend(spec.split_whitespace());
        self.exec(i, &a)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.ns {
            if let Err(e) = sh(&["ip", "netns", "del", ns]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// A `ferry run` inside a namespace (killed on drop).
struct NsNode {
    child: Option<Child>,
    root: PathBuf,
    log: PathBuf,
}

impl NsNode {
    #[allow(clippy::too_many_arguments)]
    fn start(
        net: &Net,
        i: usize,
        base: &Path,
        name: &str,
        tls: &Path,
        role: &str,
        peer: &str,
    ) -> NsNode {
        let root = base.join(format!("root-{name}"));
        std::fs::create_dir_all(&root).unwrap();
        let log = base.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &net.ns[i], ferry(), "run"])
            .arg("--root")
            .arg(&root)
            .args(["--name", name, "--role", role, "--peer", peer])
            .arg("--tls-dir")
            .arg(tls)
            .args(["--listen", &format!("{}:7443", net.ip[i])])
            .env("FERRY_LOG_LEVEL", "debug")
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        NsNode {
            child: Some(child),
            root,
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// (VmRSS, VmHWM) in KiB.
    fn rss(&self) -> (u64, u64) {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let get = |k: &str| {
            s.lines()
                .find(|l| l.starts_with(k))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                .unwrap_or(0)
        };
        (get("VmRSS:"), get("VmHWM:"))
    }

    fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    fn tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let l: Vec<&str> = s.lines().collect();
        l[l.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for NsNode {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Writes while the link is cut: new files, rewrites, deletes and renames,
/// at a bounded rate until `stop`.
fn writer(
    root: PathBuf,
    seed: u64,
    stop: Arc<AtomicBool>,
    bytes: Arc<AtomicU64>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) && n < 100_000 {
            let d = root.join(format!("cut{}", n % 20));
            std::fs::create_dir_all(&d).unwrap();
            let len = rng.usize(1_000..40_000);
            std::fs::write(d.join(format!("w{n}.sv")), sv_content(&mut rng, len)).unwrap();
            bytes.fetch_add(len as u64, Ordering::Relaxed);
            match n % 10 {
                3 => {
                    let _ = std::fs::remove_file(d.join(format!("w{}.sv", n.saturating_sub(20))));
                }
                7 => {
                    let _ = std::fs::rename(
                        d.join(format!("w{}.sv", n.saturating_sub(40))),
                        d.join(format!("r{n}.sv")),
                    );
                }
                _ => {}
            }
            n += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        n
    })
}

#[test]
fn g1_partition_with_delay_loss_and_a_cut_converges_in_bounded_memory() {
    if !is_root() {
        eprintln!("SKIPPED: network namespaces, veth and tc netem need root");
        return;
    }
    let soak = std::env::var_os("FERRY_SOAK").is_some_and(|v| v == "1");
    let cut = if soak {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(15)
    };
    let mut net = Net::new().expect("setting up namespaces and veth");
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let pki = Pki::new(base, "ca-partition");
    let mut replica = NsNode::start(
        &net,
        1,
        base,
        "replica-0",
        &pki.issue("replica-0"),
        "replica",
        &format!("primary={}:7443", net.ip[0]),
    );
    let mut primary = NsNode::start(
        &net,
        0,
        base,
        "primary",
        &pki.issue("primary"),
        "primary",
        &format!("replica-0={}:7443", net.ip[1]),
    );
    let how = net.impair().expect("impairing the link");
    eprintln!("link: {how}");
    let mut rng = fastrand::Rng::with_seed(seed());
    for d in 0..10 {
        write_files(&primary.root.join(format!("base{d}")), "f", 50, &mut rng);
    }
    let took = wait_converged(&primary.root, &replica.root, Duration::from_secs(60));
    eprintln!("base data converged over the impaired link in {took:?}");
    let (_, hwm_before) = primary.rss();

    net.cut().expect("cutting the link");
    let stop = Arc::new(AtomicBool::new(false));
    let bytes = Arc::new(AtomicU64::new(0));
    let w = writer(
        primary.root.clone(),
        seed() ^ 1,
        stop.clone(),
        bytes.clone(),
    );
    let t0 = Instant::now();
    let mut peak_rss = 0;
    while t0.elapsed() < cut {
        peak_rss = peak_rss.max(primary.rss().0);
        assert!(
            primary.alive(),
            "primary died during the cut:\n{}",
            primary.tail()
        );
        assert!(
            replica.alive(),
            "replica died during the cut:\n{}",
            replica.tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, hwm_cut) = primary.rss();
    net.impair().expect("healing the link");
    let healed = Instant::now();
    // writes go on for a moment after the heal, then stop
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let writes = w.join().unwrap();
    let took = wait_converged(&primary.root, &replica.root, Duration::from_secs(90));
    let since_heal = healed.elapsed();
    eprintln!(
        "cut {cut:?} with {writes} writes ({} bytes): converged {since_heal:?} after the heal ({took:?} after the writes stopped); primary RSS peak during the cut {} KiB (sampled), VmHWM {} KiB before the cut, {} KiB after it",
        bytes.load(Ordering::Relaxed),
        peak_rss,
        hwm_before,
        hwm_cut
    );
    assert!(writes > 100, "the writer barely ran ({writes} writes)");
    assert!(
        hwm_cut <= RSS_BOUND_KIB,
        "primary peak RSS {hwm_cut} KiB during the cut is over {RSS_BOUND_KIB} KiB"
    );
    drop(primary);
    drop(replica);
    drop(net);
}
