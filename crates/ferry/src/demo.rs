//! `ferry demo`: one command, no cluster. A temporary CA, a primary and a
//! replica on loopback, sample data written into the primary's root and
//! shown arriving, both directories printed so you can write there by hand.

use crate::cli::DemoArgs;
use crate::config::*;
use crate::node::{self, NodeHandle};
use ferry_store::Role;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn node_cfg(root: &Path, name: &str, tls: &Path, role: Role, peers: Vec<PeerSpec>) -> NodeConfig {
    NodeConfig {
        root: root.to_path_buf(),
        name: name.into(),
        tls_dir: tls.to_path_buf(),
        listen: "127.0.0.1:0".parse().expect("literal"),
        role_seed: role,
        role_explicit: true,
        peers,
        state_dir: root.join(".ferry"),
        state_rel: ferry_proto::RelPath::new(".ferry").ok(),
        metrics_addr: Some("127.0.0.1:0".parse().expect("literal")),
        excludes: Vec::new(),
        safe_links: false,
        batch_idle: DEFAULT_BATCH_IDLE,
        batch_max_delay: DEFAULT_BATCH_MAX_DELAY,
        shutdown_grace: Duration::from_secs(5),
        max_inflight: DEFAULT_MAX_INFLIGHT,
        log_capacity: DEFAULT_LOG_CAPACITY,
        log_max_items: crate::config::DEFAULT_LOG_MAX_ITEMS,
        rescan_interval: Some(crate::config::DEFAULT_RESCAN_INTERVAL),
        max_conn_age: DEFAULT_MAX_CONN_AGE,
        congestion: ferry_net::Congestion::default(),
        wire: ferry_proto::VERSIONS,
    }
}

/// Files and bytes below `root`, leaving out the state dir.
fn tree_size(root: &Path) -> (u64, u64) {
    let mut files = 0;
    let mut bytes = 0;
    let walker = walkdir::WalkDir::new(root)
        .min_depth(1)
        .into_iter()
        .filter_entry(|e| e.file_name() != ".ferry");
    for e in walker.flatten() {
        if e.file_type().is_file() {
            files += 1;
            bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    (files, bytes)
}

fn write_sample(root: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(root.join("docs"))?;
    std::fs::create_dir_all(root.join("data/2026/11"))?;
    std::fs::create_dir_all(root.join("logs"))?;
    std::fs::create_dir_all(root.join("empty-dir"))?;
    for i in 0..300 {
        let p = root.join(format!("data/2026/11/record-{i:04}.json"));
        std::fs::write(
            p,
            format!("{{\"id\":{i},\"payload\":\"{}\"}}\n", "x".repeat(200 + i)),
        )?;
    }
    let mut big = Vec::with_capacity(8 << 20);
    let mut x: u64 = 0x9e3779b97f4a7c15;
    while big.len() < 8 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        big.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(root.join("data/blob.bin"), &big)?;
    std::fs::write(
        root.join("docs/README.txt"),
        "Files written here are replicated by ferry.\n",
    )?;
    std::os::unix::fs::symlink("docs/README.txt", root.join("README-link"))?;
    std::fs::create_dir_all(root.join("staging/batch-1"))?;
    std::fs::write(root.join("staging/batch-1/part.csv"), "a,b,c\n1,2,3\n")?;
    std::fs::rename(root.join("staging/batch-1"), root.join("data/batch-1"))?;
    Ok(())
}

async fn start_pair(base: &Path) -> anyhow::Result<(NodeHandle, NodeHandle, PathBuf, PathBuf)> {
    let ca = base.join("ca");
    ferry_net::certs::init_ca(&ca, "ferry demo CA")?;
    let tls_p = base.join("tls-primary");
    let tls_r = base.join("tls-replica");
    ferry_net::certs::issue(&ca, "primary", &tls_p, 1)?;
    ferry_net::certs::issue(&ca, "replica", &tls_r, 1)?;
    let root_p = base.join("primary");
    let root_r = base.join("replica");
    std::fs::create_dir_all(&root_p)?;
    std::fs::create_dir_all(&root_r)?;
    // A replica never dials; its peer entry only names who may connect.
    let replica = node::start(node_cfg(
        &root_r,
        "replica",
        &tls_r,
        Role::Replica,
        vec![PeerSpec {
            name: "primary".into(),
            addr: "127.0.0.1:9".into(),
        }],
    ))
    .await?;
    let primary = node::start(node_cfg(
        &root_p,
        "primary",
        &tls_p,
        Role::Primary,
        vec![PeerSpec {
            name: "replica".into(),
            addr: replica.listen.to_string(),
        }],
    ))
    .await?;
    Ok((primary, replica, root_p, root_r))
}

pub async fn run(a: DemoArgs) -> i32 {
    match run_inner(a).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ferry demo: {e:#}");
            1
        }
    }
}

async fn run_inner(a: DemoArgs) -> anyhow::Result<()> {
    // One signal stream for the whole run, installed first: a ctrl_c() future
    // made anew each tick would miss a SIGINT arriving between two ticks.
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let tmp = tempfile::Builder::new().prefix("ferry-demo-").tempdir()?;
    let base = tmp.path().to_path_buf();
    let (primary, replica, root_p, root_r) = start_pair(&base).await?;
    let tty = std::io::stdout().is_terminal();
    println!("ferry demo: a primary and a replica on loopback, with their own temporary CA.\n");
    println!("  primary root:  {}", root_p.display());
    println!("  replica root:  {}", root_r.display());
    if let (Some(mp), Some(mr)) = (primary.metrics_addr, replica.metrics_addr) {
        println!("  metrics:       http://{mp}/metrics (primary), http://{mr}/metrics (replica)");
    }
    println!("\nWriting sample data into the primary: 300 records, an 8 MiB blob, a symlink, an empty dir, a directory move.");
    println!("Write, rename or delete files in the primary root yourself and watch them arrive. Ctrl-C stops.\n");
    let t0 = Instant::now();
    {
        let root_p = root_p.clone();
        tokio::task::spawn_blocking(move || write_sample(&root_p)).await??;
    }
    let bar = indicatif::ProgressBar::new_spinner();
    if !tty {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.enable_steady_tick(Duration::from_millis(120));
    let deadline = a.seconds.map(|s| Instant::now() + Duration::from_secs(s));
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    let mut last_print = Instant::now() - Duration::from_secs(10);
    let mut last_append = Instant::now();
    let mut line = 0u64;
    let mut first_sync: Option<Duration> = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if last_append.elapsed() >= Duration::from_secs(1) {
            line += 1;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(root_p.join("logs/app.log"))?;
            writeln!(
                f,
                "line {line}: the app keeps writing; ferry keeps shipping"
            )?;
            last_append = Instant::now();
        }
        let (pf, pb) = tree_size(&root_p);
        let (rf, rb) = tree_size(&root_r);
        let rm = &replica.shared.metrics;
        let pm = &primary.shared.metrics;
        // "in sync" only when it is: the replica acknowledged every batch the
        // primary sealed, and both trees hold the same files and bytes
        let sealed = pm.sealed_seq.get();
        let acked = pm.acked_seq.with_label_values(&["replica"]).get();
        let unacked = pm.unacked.with_label_values(&["replica"]).get();
        let in_sync = pf == rf && pb == rb && unacked == 0 && acked >= sealed;
        if in_sync && first_sync.is_none() {
            first_sync = Some(t0.elapsed());
        }
        // recent lag: the last acknowledged batch's, not an average since start
        let (lag, rpo) = {
            let st = primary.shared.status.lock().expect("status");
            st.peers
                .iter()
                .find(|p| p.name == "replica")
                .map(|p| (p.lag_s, p.rpo_s))
                .unwrap_or((None, 0.0))
        };
        let lag = lag
            .map(|l| format!("{:.1} ms", l * 1e3))
            .unwrap_or_else(|| "-".into());
        let msg = format!(
            "replica {rf}/{pf} files, {:.1}/{:.1} MiB | batches applied {} | lag {lag} (last batch) | {}",
            rb as f64 / 1048576.0,
            pb as f64 / 1048576.0,
            rm.batches_applied.get(),
            if in_sync {
                "in sync".to_string()
            } else {
                format!("catching up: {unacked} batches behind, oldest {rpo:.1} s")
            }
        );
        bar.set_message(msg.clone());
        if !tty && last_print.elapsed() >= Duration::from_secs(2) {
            println!("{msg}");
            last_print = Instant::now();
        }
    }
    bar.finish_and_clear();
    let (pf, pb) = tree_size(&root_p);
    let (rf, rb) = tree_size(&root_r);
    println!(
        "\nstopping: replica holds {rf}/{pf} files ({rb}/{pb} bytes); first in sync after {}",
        first_sync
            .map(|d| format!("{:.2} s", d.as_secs_f64()))
            .unwrap_or_else(|| "not yet".into())
    );
    primary.shutdown().await;
    replica.shutdown().await;
    if a.keep {
        let kept = tmp.keep();
        println!("kept {}", kept.display());
    }
    println!("demo stopped cleanly");
    Ok(())
}
