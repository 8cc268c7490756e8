//! The transport: QUIC (quinn) with mutual TLS (rustls), peer identity
//! checks (G8), framed ferry messages over streams, and certificate issuing.
//!
//! Layer: I/O. This is the only crate that knows quinn and rustls exist;
//! callers see [`Transport`], [`Conn`], [`MsgSend`] and [`MsgRecv`], which
//! carry [`ferry_proto::Message`]s. Start at [`Transport::bind`].
#![forbid(unsafe_code)]

pub mod certs;
pub mod testing;
mod tls;

pub use tls::{cert_info, inspect_tls, load_tls, CertInfo, TlsMaterial, TlsReport, TlsWatch};

use bytes::BytesMut;
use ferry_proto::{FrameDecoder, Message, ProtoError, ALPN};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

/// Per-stream receive window: 16 MiB keeps a 1 Gbit/s, 100 ms RTT link full
/// (bandwidth-delay product 12.5 MB).
pub const STREAM_WINDOW: u32 = 16 << 20;
/// Per-connection receive window (all streams together).
pub const CONN_WINDOW: u32 = 32 << 20;
/// Send buffer per connection: data sent and not yet acknowledged (held in
/// memory). 16 MiB still covers a 1 Gbit/s × 100 ms link (12.5 MB).
pub const SEND_WINDOW: u64 = 16 << 20;
/// Concurrent bidirectional streams a peer may open.
pub const MAX_STREAMS: u32 = 8;
/// A silent peer is dropped after this long: a dead peer is noticed and
/// redialled within about this time (retransmission backoff means a reset
/// from a restarted peer can come later than this).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep-alive ping interval (well under the idle timeout and NAT timeouts).
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// Connection attempts being handshaken at once; more are refused.
pub const MAX_INCOMING: usize = 64;
/// Time allowed for a handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default cap on a connection's age: a connection this old is closed (the
/// dialer redials), so rotated certificates and CAs reach long-lived
/// connections too. A peer that does not redial by itself is cut by the
/// accepting side a quarter of the cap later.
pub const DEFAULT_MAX_CONN_AGE: Duration = Duration::from_secs(3600);
/// Application close code of a connection closed by the age cap.
pub const CLOSE_AGE_CAP: u32 = 3;
/// Connections one peer may hold open to this node at once. A primary needs
/// one (two briefly, while a dead one times out after a restart); more are
/// closed at once, so a peer cannot multiply the per-connection windows.
pub const MAX_CONNS_PER_PEER: usize = 4;
/// Application close code of a connection over [`MAX_CONNS_PER_PEER`].
pub const CLOSE_TOO_MANY: u32 = 4;
/// Application close code of a `ferry check` probe: a handshake only, not a
/// node (re)starting; a primary does not redial because of it.
pub const CLOSE_PROBE: u32 = 5;

/// Why a [`Transport::probe`] failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeError {
    /// No answer within the time allowed.
    NoAnswer,
    /// This node refused the peer's certificate (rustls' reason).
    PeerCertificate(String),
    /// The peer refused this node's certificate (its TLS alert).
    RefusedByPeer(String),
    /// Anything else, as quinn says it.
    Other(String),
}

/// A QUIC close code in the range of TLS alerts.
fn is_tls_alert(code: u64) -> bool {
    (0x100..0x200).contains(&code)
}

/// Errors of the transport, each naming its cause.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("TLS file {path}: {reason}")]
    TlsFile { path: String, reason: String },
    #[error("TLS setup failed: {0}")]
    TlsConfig(String),
    #[error("cannot listen on {addr}: {error}; is another process using the port?")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("connecting to {name} at {addr} failed: {reason}")]
    Connect {
        name: String,
        addr: SocketAddr,
        reason: String,
    },
    #[error("peer {addr} was refused: {reason}")]
    PeerRefused { addr: SocketAddr, reason: String },
    #[error("connection lost: {0}")]
    Lost(String),
    /// The connection reached its age cap and was closed on purpose; the
    /// dialer redials (and so picks up rotated certificates). Not a fault.
    #[error("connection age cap reached; redialling (picks up rotated certificates)")]
    AgeCap,
    #[error("refused a connection from {peer} at {addr}: it already holds {limit} open connections (MAX_CONNS_PER_PEER)")]
    TooManyConnections {
        peer: String,
        addr: SocketAddr,
        limit: usize,
    },
    #[error("peer sent a malformed message: {0}")]
    Proto(#[from] ProtoError),
    #[error("handshake timed out")]
    Timeout,
    #[error("certificate issuing failed: {0}")]
    Cert(String),
}

/// One QUIC endpoint: listens for peers and dials them.
pub struct Transport {
    ep: quinn::Endpoint,
    /// Replaced by [`Transport::reload_tls`]; each dial clones the current one.
    client: RwLock<quinn::ClientConfig>,
    transport: Arc<quinn::TransportConfig>,
    allowed: Arc<Vec<String>>,
    max_age: Duration,
    /// Open accepted connections, by peer name.
    live: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

/// One accepted connection's place in [`Transport`]'s per-peer count,
/// given back when the last handle to the connection is dropped.
struct Slot {
    live: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    peer: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = live.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                live.remove(&self.peer);
            }
        }
    }
}

fn server_quic_config(
    tls: &TlsMaterial,
    allowed: &[String],
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, NetError> {
    let server_tls = tls::server_config(tls, allowed)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(server_tls)
            .map_err(|e| NetError::TlsConfig(e.to_string()))?,
    ));
    server
        .transport_config(transport)
        .migration(false)
        .max_incoming(MAX_INCOMING)
        .incoming_buffer_size(64 << 10)
        .incoming_buffer_size_total(4 << 20);
    Ok(server)
}

fn client_quic_config(
    tls: &TlsMaterial,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig, NetError> {
    let client_tls = tls::client_config(tls)?;
    let mut client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client_tls)
            .map_err(|e| NetError::TlsConfig(e.to_string()))?,
    ));
    client.transport_config(transport);
    Ok(client)
}

/// Closes `conn` once it is `age` old (unless it closed before). The timer
/// task holds a clone of the connection; the returned guard aborts it when
/// the last [`Conn`] is dropped, so dropping a connection still closes it.
fn cap_age(conn: &quinn::Connection, age: Duration) -> Arc<AgeCap> {
    let conn = conn.clone();
    let fired = Arc::new(AtomicBool::new(false));
    let f2 = fired.clone();
    let task = tokio::spawn(async move {
        tokio::select! {
            _ = tokio::time::sleep(age) => {
                f2.store(true, Ordering::Relaxed);
                conn.close(
                    CLOSE_AGE_CAP.into(),
                    b"connection age cap reached; redial (picks up rotated certificates)",
                )
            }
            _ = conn.closed() => {}
        }
    });
    Arc::new(AgeCap {
        task: task.abort_handle(),
        fired,
    })
}

/// The congestion controller of every connection (see docs/ARCHITECTURE.md,
/// "QUIC").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// BBR's window on long paths, CUBIC's on short ones (minimum RTT under
    /// [`SHORT_PATH`]): both controllers see every event, the path's RTT
    /// picks whose window counts. The default.
    #[default]
    Auto,
    /// Model-based: keeps a long, lossy link full (random loss is not read
    /// as congestion).
    Bbr,
    /// Loss-based (quinn's own default): less sender CPU at very high rates
    /// on clean, short links (a LAN).
    Cubic,
}

/// A path whose minimum RTT is under this is short (a LAN, loopback).
pub const SHORT_PATH: Duration = Duration::from_millis(5);

/// [`Congestion::Auto`]: CUBIC and BBR side by side.
struct AutoCc {
    bbr: Box<dyn quinn::congestion::Controller>,
    cubic: Box<dyn quinn::congestion::Controller>,
    short: bool,
}

impl quinn::congestion::Controller for AutoCc {
    fn on_sent(&mut self, now: std::time::Instant, bytes: u64, last_packet_number: u64) {
        self.bbr.on_sent(now, bytes, last_packet_number);
        self.cubic.on_sent(now, bytes, last_packet_number);
    }
    fn on_ack(
        &mut self,
        now: std::time::Instant,
        sent: std::time::Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &quinn_proto::RttEstimator,
    ) {
        self.short = rtt.min() < SHORT_PATH;
        self.bbr.on_ack(now, sent, bytes, app_limited, rtt);
        self.cubic.on_ack(now, sent, bytes, app_limited, rtt);
    }
    fn on_end_acks(
        &mut self,
        now: std::time::Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.bbr
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
        self.cubic
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }
    fn on_congestion_event(
        &mut self,
        now: std::time::Instant,
        sent: std::time::Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.bbr
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
        self.cubic
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }
    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.bbr.on_mtu_update(new_mtu);
        self.cubic.on_mtu_update(new_mtu);
    }
    fn window(&self) -> u64 {
        if self.short {
            self.cubic.window()
        } else {
            self.bbr.window()
        }
    }
    fn metrics(&self) -> quinn::congestion::ControllerMetrics {
        if self.short {
            self.cubic.metrics()
        } else {
            self.bbr.metrics()
        }
    }
    fn clone_box(&self) -> Box<dyn quinn::congestion::Controller> {
        Box::new(AutoCc {
            bbr: self.bbr.clone_box(),
            cubic: self.cubic.clone_box(),
            short: self.short,
        })
    }
    fn initial_window(&self) -> u64 {
        self.bbr.initial_window()
    }
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

struct AutoCcFactory;

impl quinn::congestion::ControllerFactory for AutoCcFactory {
    fn build(
        self: Arc<Self>,
        now: std::time::Instant,
        current_mtu: u16,
    ) -> Box<dyn quinn::congestion::Controller> {
        Box::new(AutoCc {
            bbr: Arc::new(quinn::congestion::BbrConfig::default()).build(now, current_mtu),
            cubic: Arc::new(quinn::congestion::CubicConfig::default()).build(now, current_mtu),
            short: false,
        })
    }
}

fn transport_config(cc: Congestion) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    match cc {
        Congestion::Auto => {
            t.congestion_controller_factory(Arc::new(AutoCcFactory));
        }
        Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        }
        Congestion::Cubic => {}
    }
    t.max_concurrent_bidi_streams(MAX_STREAMS.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(STREAM_WINDOW.into())
        .receive_window(CONN_WINDOW.into())
        .send_window(SEND_WINDOW)
        .max_idle_timeout(Some(
            IDLE_TIMEOUT
                .try_into()
                .expect("10 s is a valid idle timeout"),
        ))
        .keep_alive_interval(Some(KEEP_ALIVE));
    t
}

/// Stops a connection's age-cap timer when the last handle goes; says
/// whether the cap closed the connection (so that is not reported as a fault).
struct AgeCap {
    task: tokio::task::AbortHandle,
    fired: Arc<AtomicBool>,
}

impl Drop for AgeCap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether a connection was closed by its age cap, shared with its streams.
#[derive(Clone, Default)]
struct Capped(Option<Arc<AtomicBool>>);

impl Capped {
    /// `Lost(e)`, or [`NetError::AgeCap`] when the age cap closed the connection.
    fn lost(&self, e: impl std::fmt::Display) -> NetError {
        if self.0.as_ref().is_some_and(|f| f.load(Ordering::Relaxed)) {
            NetError::AgeCap
        } else {
            NetError::Lost(e.to_string())
        }
    }
}

impl Transport {
    /// Binds `listen` and prepares client and server TLS. Only peers whose
    /// certificate chains to the CA and names one of `allowed` get in.
    pub fn bind(
        listen: SocketAddr,
        tls: &TlsMaterial,
        allowed: Vec<String>,
    ) -> Result<Transport, NetError> {
        Self::bind_with(listen, tls, allowed, Congestion::default())
    }

    /// [`Transport::bind`] with a chosen congestion controller.
    pub fn bind_with(
        listen: SocketAddr,
        tls: &TlsMaterial,
        allowed: Vec<String>,
        congestion: Congestion,
    ) -> Result<Transport, NetError> {
        let transport = Arc::new(transport_config(congestion));
        let server = server_quic_config(tls, &allowed, transport.clone())?;
        let client = client_quic_config(tls, transport.clone())?;
        let socket = std::net::UdpSocket::bind(listen).map_err(|source| NetError::Bind {
            addr: listen,
            error: source,
        })?;
        // Stateless-reset key derived from the node's private key: a restarted
        // node answers packets of a connection it no longer knows with a reset
        // the peer accepts, so the peer reconnects at once instead of waiting
        // for the idle timeout.
        let secret =
            blake3::derive_key("ferry 2026 QUIC stateless reset key", tls.key.secret_der());
        let reset_key = Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret));
        let ep = quinn::Endpoint::new(
            quinn::EndpointConfig::new(reset_key),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| NetError::Bind {
            addr: listen,
            error: source,
        })?;
        Ok(Transport {
            ep,
            client: RwLock::new(client),
            transport,
            allowed: Arc::new(allowed),
            max_age: DEFAULT_MAX_CONN_AGE,
            live: Arc::default(),
        })
    }

    /// Sets the connection-age cap (default [`DEFAULT_MAX_CONN_AGE`]) for
    /// connections made from now on: dialled connections are closed at
    /// `age`, accepted ones at `age * 5 / 4` (the dialer should go first).
    pub fn set_max_conn_age(&mut self, age: Duration) {
        self.max_age = age.max(Duration::from_millis(100));
    }

    /// Swaps in new certificates, key and CAs: every handshake from now on
    /// (dialled or accepted) uses them; open connections keep theirs until
    /// they close (see [`Transport::set_max_conn_age`]). Nothing changes
    /// when `tls` does not make a valid configuration.
    pub fn reload_tls(&self, tls: &TlsMaterial) -> Result<(), NetError> {
        let server = server_quic_config(tls, &self.allowed, self.transport.clone())?;
        let client = client_quic_config(tls, self.transport.clone())?;
        self.ep.set_server_config(Some(server));
        *self.client.write().unwrap_or_else(PoisonError::into_inner) = client;
        Ok(())
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.ep.local_addr()
    }

    /// Dials peer `name` at `addr`; the server's certificate must be valid
    /// for `name` and chain to the CA.
    pub async fn connect(&self, addr: SocketAddr, name: &str) -> Result<Conn, NetError> {
        let err = |reason: String| NetError::Connect {
            name: name.to_owned(),
            addr,
            reason,
        };
        let client = self
            .client
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let connecting = self
            .ep
            .connect_with(client, addr, name)
            .map_err(|e| err(e.to_string()))?;
        let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
            .await
            .map_err(|_| err("handshake timed out (peer down or UDP blocked?)".into()))?
            .map_err(|e| err(e.to_string()))?;
        let cap = cap_age(&conn, self.max_age);
        Ok(Conn {
            inner: conn,
            peer: name.to_owned(),
            _cap: Some(cap),
            _slot: None,
        })
    }

    /// `ferry check`: a full mutual-TLS handshake with `name` at `addr`,
    /// then a clean close ([`CLOSE_PROBE`]). Succeeds only once the peer has
    /// confirmed the handshake (QUIC's HANDSHAKE_DONE, sent after it
    /// accepted this node's certificate); returns the round-trip time.
    pub async fn probe(
        &self,
        addr: SocketAddr,
        name: &str,
        limit: Duration,
    ) -> Result<Duration, ProbeError> {
        let client = self
            .client
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let deadline = tokio::time::Instant::now() + limit;
        let classify = |e: quinn::ConnectionError| match e {
            quinn::ConnectionError::TransportError(t) if is_tls_alert(u64::from(t.code)) => {
                ProbeError::PeerCertificate(t.reason)
            }
            quinn::ConnectionError::ConnectionClosed(c)
                if is_tls_alert(u64::from(c.error_code)) =>
            {
                ProbeError::RefusedByPeer(c.to_string())
            }
            quinn::ConnectionError::TimedOut => ProbeError::NoAnswer,
            other => ProbeError::Other(other.to_string()),
        };
        let connecting = self
            .ep
            .connect_with(client, addr, name)
            .map_err(|e| ProbeError::Other(e.to_string()))?;
        let conn = match tokio::time::timeout_at(deadline, connecting).await {
            Err(_) => return Err(ProbeError::NoAnswer),
            Ok(Err(e)) => return Err(classify(e)),
            Ok(Ok(c)) => c,
        };
        // The client side counts as connected before the peer has checked
        // its certificate: wait for the peer's HANDSHAKE_DONE or its refusal.
        loop {
            if let Some(e) = conn.close_reason() {
                return Err(classify(e));
            }
            if conn.stats().frame_rx.handshake_done > 0 {
                let rtt = conn.rtt();
                conn.close(CLOSE_PROBE.into(), b"ferry check");
                return Ok(rtt);
            }
            if tokio::time::Instant::now() >= deadline {
                conn.close(CLOSE_PROBE.into(), b"ferry check");
                return Err(ProbeError::NoAnswer);
            }
            tokio::select! {
                _ = conn.closed() => {}
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
    }

    /// Waits for the next authenticated peer. Returns `None` once the
    /// endpoint is closed. Failed handshakes are reported as `Some(Err)`.
    pub async fn accept(&self) -> Option<Result<Conn, NetError>> {
        let incoming = self.ep.accept().await?;
        let addr = incoming.remote_address();
        let res = async {
            let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming)
                .await
                .map_err(|_| NetError::Timeout)?
                .map_err(|e| match &e {
                    // a TLS alert: the peer's certificate or name was refused
                    quinn::ConnectionError::TransportError(t)
                        if (0x100..0x200).contains(&u64::from(t.code)) =>
                    {
                        NetError::PeerRefused {
                            addr,
                            reason: e.to_string(),
                        }
                    }
                    // the peer gave up on its own (closed, timed out, reset)
                    _ => NetError::Lost(format!("{addr}: {e}")),
                })?;
            let peer =
                tls::peer_name(&conn, &self.allowed).ok_or_else(|| NetError::PeerRefused {
                    addr,
                    reason: "certificate names no allowed peer".into(),
                })?;
            let slot = {
                let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
                let n = live.entry(peer.clone()).or_default();
                if *n >= MAX_CONNS_PER_PEER {
                    drop(live);
                    conn.close(
                        CLOSE_TOO_MANY.into(),
                        b"too many open connections from this peer",
                    );
                    return Err(NetError::TooManyConnections {
                        peer,
                        addr,
                        limit: MAX_CONNS_PER_PEER,
                    });
                }
                *n += 1;
                Arc::new(Slot {
                    live: self.live.clone(),
                    peer: peer.clone(),
                })
            };
            let cap = cap_age(&conn, self.max_age + self.max_age / 4);
            Ok(Conn {
                inner: conn,
                peer,
                _cap: Some(cap),
                _slot: Some(slot),
            })
        }
        .await;
        Some(res)
    }

    /// Stops accepting and closes every connection.
    pub fn close(&self) {
        self.ep.close(0u32.into(), b"shutdown");
    }

    /// Waits until every connection is closed cleanly (bounded by the caller).
    pub async fn wait_idle(&self) {
        self.ep.wait_idle().await;
    }
}

/// An authenticated connection to a named peer.
#[derive(Clone)]
pub struct Conn {
    inner: quinn::Connection,
    peer: String,
    _cap: Option<Arc<AgeCap>>,
    _slot: Option<Arc<Slot>>,
}

impl Conn {
    fn capped(&self) -> Capped {
        Capped(self._cap.as_ref().map(|c| c.fired.clone()))
    }

    /// The peer's node name, from its certificate.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    pub fn remote_addr(&self) -> SocketAddr {
        self.inner.remote_address()
    }

    /// Opens a stream for messages.
    pub async fn open(&self) -> Result<(MsgSend, MsgRecv), NetError> {
        let (s, r) = self
            .inner
            .open_bi()
            .await
            .map_err(|e| self.capped().lost(e))?;
        Ok((
            MsgSend::new(s, self.capped()),
            MsgRecv::new(r, self.capped()),
        ))
    }

    /// Accepts the peer's next stream.
    pub async fn accept(&self) -> Result<(MsgSend, MsgRecv), NetError> {
        let (s, r) = self
            .inner
            .accept_bi()
            .await
            .map_err(|e| self.capped().lost(e))?;
        Ok((
            MsgSend::new(s, self.capped()),
            MsgRecv::new(r, self.capped()),
        ))
    }

    /// Closes with an application code and a reason the peer sees.
    pub fn close(&self, code: u32, reason: &str) {
        self.inner.close(code.into(), reason.as_bytes());
    }

    /// Resolves when the connection is closed: the application's close code
    /// and reason if the peer closed it, else `None`.
    pub async fn closed_by_peer(&self) -> Option<(u64, Vec<u8>)> {
        match self.inner.closed().await {
            quinn::ConnectionError::ApplicationClosed(a) => {
                Some((a.error_code.into_inner(), a.reason.to_vec()))
            }
            _ => None,
        }
    }

    /// Resolves when the connection is closed, with the reason.
    pub async fn closed(&self) -> String {
        self.inner.closed().await.to_string()
    }

    /// Bytes sent on the wire so far (UDP payload).
    pub fn bytes_sent(&self) -> u64 {
        self.inner.stats().udp_tx.bytes
    }

    pub fn rtt(&self) -> Duration {
        self.inner.rtt()
    }
}

/// Sends framed messages; small messages are buffered until [`MsgSend::flush`]
/// or until the buffer passes 256 KiB.
pub struct MsgSend {
    s: quinn::SendStream,
    buf: BytesMut,
    capped: Capped,
}

const SEND_BUF: usize = 256 << 10;

impl MsgSend {
    fn new(s: quinn::SendStream, capped: Capped) -> Self {
        MsgSend {
            s,
            capped,
            buf: BytesMut::with_capacity(SEND_BUF + ferry_proto::MAX_FRAME),
        }
    }

    /// Queues `m`, writing out when the buffer is full.
    pub async fn send(&mut self, m: &Message) -> Result<(), NetError> {
        if let Some(payload) = ferry_proto::encode_head(m, &mut self.buf) {
            // file data: the payload goes as it is, not copied into the buffer
            self.flush().await?;
            let capped = &self.capped;
            return self
                .s
                .write_chunk(payload)
                .await
                .map_err(|e| capped.lost(e));
        }
        ferry_proto::encode(m, &mut self.buf);
        if self.buf.len() >= SEND_BUF {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes out everything queued.
    pub async fn flush(&mut self) -> Result<(), NetError> {
        if !self.buf.is_empty() {
            let chunk = self.buf.split().freeze();
            let capped = &self.capped;
            self.s
                .write_chunk(chunk)
                .await
                .map_err(|e| capped.lost(e))?;
        }
        Ok(())
    }

    /// Writes `bytes` as they are, unframed, after what is queued. For tests
    /// and tools that must speak a broken protocol on purpose (see
    /// `tests/hostile.rs`); ferry itself only sends [`Message`]s.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), NetError> {
        self.buf.extend_from_slice(bytes);
        self.flush().await
    }

    /// Flushes and ends the stream.
    pub async fn finish(&mut self) -> Result<(), NetError> {
        self.flush().await?;
        self.s.finish().map_err(|e| self.capped.lost(e))
    }

    /// Flushes, ends the stream and waits (up to `limit`) until the peer has
    /// read it or stopped it: a last message (a refusal) is not lost to a
    /// connection closed right after.
    pub async fn finish_and_wait(&mut self, limit: Duration) -> Result<(), NetError> {
        self.finish().await?;
        let _ = tokio::time::timeout(limit, self.s.stopped()).await;
        Ok(())
    }
}

/// Receives framed messages, never buffering more than one frame.
pub struct MsgRecv {
    r: quinn::RecvStream,
    dec: FrameDecoder,
    capped: Capped,
}

impl MsgRecv {
    fn new(r: quinn::RecvStream, capped: Capped) -> Self {
        MsgRecv {
            r,
            dec: FrameDecoder::new(),
            capped,
        }
    }

    /// The next message; `Ok(None)` when the peer ended the stream cleanly.
    pub async fn recv(&mut self) -> Result<Option<Message>, NetError> {
        loop {
            if let Some(m) = self.dec.next()? {
                return Ok(Some(m));
            }
            let want = self.dec.wanted()?;
            match self
                .r
                .read_chunk(want.clamp(64 << 10, ferry_proto::MAX_FRAME), true)
                .await
            {
                Ok(Some(chunk)) => self.dec.extend(&chunk.bytes),
                Ok(None) => {
                    if self.dec.buffered() > 0 {
                        return Err(NetError::Proto(ProtoError::Truncated("stream end")));
                    }
                    return Ok(None);
                }
                // The peer closed the connection on purpose (shutdown): a clean end.
                Err(quinn::ReadError::ConnectionLost(
                    quinn::ConnectionError::ApplicationClosed(c),
                )) if c.error_code == quinn::VarInt::from_u32(0) && self.dec.buffered() == 0 => {
                    return Ok(None)
                }
                Err(e) => return Err(self.capped.lost(e)),
            }
        }
    }
}

/// Re-exported so callers can build names without depending on rustls.
pub fn valid_node_name(name: &str) -> bool {
    rustls_pki_types::DnsName::try_from(name).is_ok()
        && !name.is_empty()
        && name.len() <= ferry_proto::MAX_NAME
}

#[doc(hidden)]
pub const _ALPN: &[u8] = ALPN;

#[cfg(test)]
mod tests {
    use super::*;

    fn material(dir: &std::path::Path, name: &str) -> TlsMaterial {
        let out = dir.join(name);
        certs::issue(&dir.join("ca"), name, &out, 1).unwrap();
        load_tls(&out, name).unwrap()
    }

    /// No 0-RTT: a client that holds a session ticket from an earlier
    /// connection still cannot send early data (quinn refuses `into_0rtt`
    /// because rustls has early data off on both sides), so nothing a peer
    /// sends is processed before the handshake, client certificate
    /// included, is complete.
    #[test]
    fn no_zero_rtt_even_with_a_session_ticket() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        certs::init_ca(&dir.path().join("ca"), "test CA").unwrap();
        let (srv, cli) = (material(dir.path(), "srv"), material(dir.path(), "cli"));
        rt.block_on(async {
            let server = Arc::new(
                Transport::bind("127.0.0.1:0".parse().unwrap(), &srv, vec!["cli".into()]).unwrap(),
            );
            let addr = server.local_addr().unwrap();
            let s2 = server.clone();
            tokio::spawn(async move {
                while let Some(c) = s2.accept().await {
                    if let Ok(c) = c {
                        tokio::spawn(async move {
                            let _ = c.accept().await;
                        });
                    }
                }
            });
            let client =
                Transport::bind("127.0.0.1:0".parse().unwrap(), &cli, vec!["srv".into()]).unwrap();
            assert_eq!(
                tls::server_config(&srv, &["cli".into()])
                    .unwrap()
                    .max_early_data_size,
                0
            );
            assert!(!tls::client_config(&cli).unwrap().enable_early_data);
            for attempt in 0..3 {
                let cfg = client.client.read().unwrap().clone();
                let connecting = client.ep.connect_with(cfg, addr, "srv").unwrap();
                let conn = match connecting.into_0rtt() {
                    Ok(_) => panic!("attempt {attempt}: 0-RTT was offered"),
                    Err(connecting) => connecting.await.expect("a full handshake works"),
                };
                // let the server's session tickets arrive before closing
                tokio::time::sleep(Duration::from_millis(100)).await;
                conn.close(0u32.into(), b"done");
            }
        });
    }

    /// A reload swaps what new handshakes use: after the client's CA set is
    /// replaced by an unrelated CA, dialling the same server fails, and
    /// putting the right CA back makes it work again, without a new
    /// endpoint.
    #[test]
    fn reload_applies_to_new_handshakes() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        certs::init_ca(&dir.path().join("ca"), "test CA").unwrap();
        let other = tempfile::tempdir().unwrap();
        certs::init_ca(&other.path().join("ca"), "other CA").unwrap();
        let (srv, cli) = (material(dir.path(), "srv"), material(dir.path(), "cli"));
        let foreign = material(other.path(), "cli");
        rt.block_on(async {
            let server = Arc::new(
                Transport::bind("127.0.0.1:0".parse().unwrap(), &srv, vec!["cli".into()]).unwrap(),
            );
            let addr = server.local_addr().unwrap();
            let s2 = server.clone();
            tokio::spawn(async move { while s2.accept().await.is_some() {} });
            let client =
                Transport::bind("127.0.0.1:0".parse().unwrap(), &cli, vec!["srv".into()]).unwrap();
            assert!(client.connect(addr, "srv").await.is_ok());
            client.reload_tls(&foreign).unwrap();
            assert!(
                client.connect(addr, "srv").await.is_err(),
                "old files still used"
            );
            client.reload_tls(&cli).unwrap();
            assert!(client.connect(addr, "srv").await.is_ok());
        });
    }
}
