//! Metrics (one Prometheus registry per node, so two nodes can share a
//! process, as in `ferry demo`), the read-only HTTP endpoints, and logging.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// `ferry_skipped_entries_total{reason}` on a replica: a step its filesystem
/// refused (a name or path it cannot hold); the rest of the batch applied.
pub const SKIP_REFUSED_BY_REPLICA: &str = "refused_by_replica";

/// The `kind` values of `ferry_errors_total` (see docs/OPERATIONS.md).
pub const ERROR_KINDS: [&str; 22] = [
    "peer_session",
    "peer_refused",
    "refused_primary",
    "auth",
    "protocol",
    "inconsistent",
    "refused",
    "bad_stream",
    "no_space",
    "fsync",
    "state_fsync",
    "io",
    "fenced",
    "watch",
    "watch_limit",
    "file_unstable",
    "seal",
    "tls_reload",
    "index",
    "conn_limit",
    "conflict",
    "version",
];

/// Per-peer series, created at 0 when the node starts.
pub fn init_peer(m: &Metrics, peer: &str) {
    m.lag.with_label_values(&[peer]);
    m.batches_sent.with_label_values(&[peer]);
    m.bytes_sent.with_label_values(&[peer]);
    m.peer_connected.with_label_values(&[peer]).set(0);
    m.peer_wire_version.with_label_values(&[peer]);
    m.unacked.with_label_values(&[peer]);
    m.acked_seq.with_label_values(&[peer]);
    m.resyncs.with_label_values(&[peer]);
    m.peer_rpo.with_label_values(&[peer]).set(0.0);
}

/// Every metric a node exports. Names are fixed by DESIGN.md.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub lag: HistogramVec,
    pub batches_sealed: IntCounter,
    pub batches_sent: IntCounterVec,
    pub batches_applied: IntCounter,
    pub batches_recovered: IntCounter,
    pub conflict_files: IntGauge,
    pub bytes_sent: IntCounterVec,
    pub bytes_applied: IntCounter,
    pub files_applied: IntCounter,
    pub peer_connected: IntGaugeVec,
    /// The wire version of the session with each peer (0: none yet).
    pub peer_wire_version: IntGaugeVec,
    pub unacked: IntGaugeVec,
    pub acked_seq: IntGaugeVec,
    pub applied_seq: IntGauge,
    pub sealed_seq: IntGauge,
    pub consistent_as_of: prometheus::Gauge,
    pub resyncs: IntCounterVec,
    pub bytes_saved: IntCounterVec,
    pub overflows: IntCounter,
    pub rescans: IntCounter,
    pub exact: IntCounter,
    pub errors: IntCounterVec,
    pub skipped: IntCounterVec,
    pub epoch: IntGauge,
    pub role: IntGaugeVec,
    pub apply_seconds: Histogram,
    pub tls_reloads: IntCounter,
    /// Primary: age of the oldest batch each peer has not acknowledged.
    pub peer_rpo: prometheus::GaugeVec,
    /// Not-after of the node certificate in use.
    pub cert_expiry: prometheus::Gauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
            r.register(Box::new(c.clone()))
                .expect("metric names are unique");
            c
        }
        let lag_buckets = vec![
            0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            10.0, 30.0, 60.0,
            // past the FerryReplicationLagHigh threshold (60 s), so its p99 can exceed it
            120.0, 300.0, 600.0,
        ];
        let m = Metrics {
            lag: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "ferry_replication_lag_seconds",
                        "Seconds from a batch's seal on the primary to the peer's durable ack.",
                    )
                    .buckets(lag_buckets),
                    &["peer"],
                )
                .unwrap(),
            ),
            batches_sealed: reg(&r, IntCounter::new("ferry_batches_sealed_total", "Batches sealed by this primary.").unwrap()),
            batches_sent: reg(&r, IntCounterVec::new(Opts::new("ferry_batches_sent_total", "Batches sent, by peer."), &["peer"]).unwrap()),
            batches_applied: reg(&r, IntCounter::new("ferry_batches_applied_total", "Batches applied and made durable on this replica.").unwrap()),
            conflict_files: reg(&r, IntGauge::new("ferry_conflict_files", "Files preserved in the state dir's conflicts/ after a demotion: writes of this node as primary that the new primary never got.").unwrap()),
            batches_recovered: reg(&r, IntCounter::new("ferry_batches_recovered_total", "Batches a crash interrupted that the replica finished from its redo journal at restart.").unwrap()),
            bytes_sent: reg(&r, IntCounterVec::new(Opts::new("ferry_bytes_sent_total", "File content bytes sent, by peer."), &["peer"]).unwrap()),
            bytes_applied: reg(&r, IntCounter::new("ferry_bytes_applied_total", "File content bytes written by this replica.").unwrap()),
            files_applied: reg(&r, IntCounter::new("ferry_files_applied_total", "Regular files replaced by this replica.").unwrap()),
            peer_connected: reg(&r, IntGaugeVec::new(Opts::new("ferry_peer_connected", "1 while the peer is connected."), &["peer"]).unwrap()),
            peer_wire_version: reg(&r, IntGaugeVec::new(Opts::new("ferry_peer_wire_version", "Wire version of the last session with the peer (the highest both speak; 0: none yet)."), &["peer"]).unwrap()),
            unacked: reg(&r, IntGaugeVec::new(Opts::new("ferry_unacked_batches", "Sealed batches the peer has not acked."), &["peer"]).unwrap()),
            acked_seq: reg(&r, IntGaugeVec::new(Opts::new("ferry_acked_seq", "Last batch the peer acked."), &["peer"]).unwrap()),
            applied_seq: reg(&r, IntGauge::new("ferry_applied_seq", "Last batch applied durably on this replica.").unwrap()),
            sealed_seq: reg(&r, IntGauge::new("ferry_sealed_seq", "Last batch sealed on this primary.").unwrap()),
            consistent_as_of: reg(&r, prometheus::Gauge::new("ferry_consistent_as_of_timestamp_seconds", "Source seal time of the last applied batch: the replica is consistent as of then.").unwrap()),
            resyncs: reg(&r, IntCounterVec::new(Opts::new("ferry_resyncs_total", "Manifest-diff resyncs, by peer."), &["peer"]).unwrap()),
            bytes_saved: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "ferry_bytes_saved_total",
                        "File bytes not sent, by reason: append (only the tail of a grown file), dedup, compression.",
                    ),
                    &["reason"],
                )
                .unwrap(),
            ),
            overflows: reg(&r, IntCounter::new("ferry_watch_overflows_total", "inotify queue overflows (events lost, rescan follows).").unwrap()),
            rescans: reg(&r, IntCounter::new("ferry_rescans_total", "Rescans of the root.").unwrap()),
            exact: reg(&r, IntCounter::new("ferry_exact_batches_total", "Batches whose content was read unchanged since seal.").unwrap()),
            errors: reg(&r, IntCounterVec::new(Opts::new("ferry_errors_total", "Errors, by kind."), &["kind"]).unwrap()),
            skipped: reg(&r, IntCounterVec::new(Opts::new("ferry_skipped_entries_total", "Entries not replicated, by reason."), &["reason"]).unwrap()),
            epoch: reg(&r, IntGauge::new("ferry_epoch", "Current epoch.").unwrap()),
            role: reg(&r, IntGaugeVec::new(Opts::new("ferry_role", "1 for the node's current role."), &["role"]).unwrap()),
            apply_seconds: reg(&r, Histogram::with_opts(HistogramOpts::new("ferry_apply_seconds", "Seconds to apply and fsync one batch on the replica.")).unwrap()),
            tls_reloads: reg(&r, IntCounter::new("ferry_tls_reloads_total", "Rotated TLS certificates loaded without a restart.").unwrap()),
            peer_rpo: reg(&r, prometheus::GaugeVec::new(Opts::new("ferry_peer_rpo_seconds", "Primary: age in seconds of the oldest sealed batch the peer has not acknowledged (0 when it has every batch): what a failover to it now would lose."), &["peer"]).unwrap()),
            cert_expiry: reg(&r, prometheus::Gauge::new("ferry_certificate_expiry_timestamp_seconds", "Not-after of the node certificate in use (Unix seconds); follows rotations.").unwrap()),
            registry: r,
        };
        // Known label values exist from the start at 0, so a healthy node still
        // exports every family (dashboards and alerts see 0, not "no data").
        for reason in ["append", "dedup", "compression"] {
            m.bytes_saved.with_label_values(&[reason]);
        }
        for kind in ERROR_KINDS {
            m.errors.with_label_values(&[kind]);
        }
        for reason in ferry_watch::SkipReason::ALL {
            m.skipped.with_label_values(&[reason.label()]);
        }
        // a step the replica's filesystem refused (see `replica.rs`)
        m.skipped.with_label_values(&[SKIP_REFUSED_BY_REPLICA]);
        let info = IntGaugeVec::new(
            Opts::new("ferry_build_info", "Build information."),
            &["version"],
        )
        .unwrap();
        info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        m.registry.register(Box::new(info)).expect("unique");
        // process_cpu_seconds_total, process_resident_memory_bytes,
        // process_open_fds, ... (of the whole process: in `ferry demo` both
        // nodes show the same numbers)
        #[cfg(target_os = "linux")]
        m.registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique");
        m
    }

    pub fn error(&self, kind: &str) {
        self.errors.with_label_values(&[kind]).inc();
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves `/metrics`, `/healthz`, `/readyz` (GET only) until the task is dropped.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    ready: Arc<AtomicBool>,
) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Method, Response, StatusCode};
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let metrics = metrics.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (status, body, ctype) = if req.method() != Method::GET {
                        (
                            StatusCode::METHOD_NOT_ALLOWED,
                            "read-only endpoint\n".to_string(),
                            "text/plain",
                        )
                    } else {
                        match req.uri().path() {
                            "/metrics" => (
                                StatusCode::OK,
                                metrics.render(),
                                "text/plain; version=0.0.4",
                            ),
                            "/healthz" => (StatusCode::OK, "ok\n".into(), "text/plain"),
                            "/readyz" => {
                                if ready.load(Ordering::Relaxed) {
                                    (StatusCode::OK, "ready\n".into(), "text/plain")
                                } else {
                                    (
                                        StatusCode::SERVICE_UNAVAILABLE,
                                        "not ready\n".into(),
                                        "text/plain",
                                    )
                                }
                            }
                            _ => (StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
                        }
                    };
                    let resp = Response::builder()
                        .status(status)
                        .header("content-type", ctype)
                        .body(Full::new(Bytes::from(body)));
                    async move { resp }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}

/// Binds the metrics listener, naming the address on failure.
pub async fn bind_metrics(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for metrics on {addr}: {e}; is another process using the port? (--metrics-addr)"))
}

/// Logs (to stderr) through tracing-subscriber: JSON unless both stdout and
/// stderr are terminals (in a container neither is), human-readable otherwise.
/// Lines carry their spans: the peer, and the batch seq for batch work.
pub fn init_logging(level: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!(
            "warn,ferry={level},ferry_net={level},ferry_watch={level}"
        ))
    });
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
        let _ = b.try_init();
    } else {
        let _ = b.json().try_init();
    }
}
