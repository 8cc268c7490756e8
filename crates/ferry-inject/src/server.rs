//! The HTTPS server: hyper (HTTP/1.1 and HTTP/2) over rustls.
//!
//! Routes: `POST /mutate` (AdmissionReview), `GET /healthz`, `GET /readyz`.
//! Connections are capped by a semaphore, TLS handshakes and request headers are
//! timed out, bodies are size-limited, and shutdown drains open connections.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::error::InjectError;
use crate::review::{self, Decision};
use crate::tls::CertStore;
use crate::InjectConfig;

/// Limits and timings of the server. [`Default`] is what `ferry inject` uses.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// How often the TLS directory is polled for a rotated certificate. The kubelet
    /// refreshes mounted Secrets about once a minute, so polling faster gains little.
    pub reload_interval: Duration,
    /// Most open connections; more wait in the kernel's accept queue. The API
    /// servers hold a few long-lived connections each, so this is generous.
    pub max_connections: usize,
    /// Time allowed for a TLS handshake.
    pub handshake_timeout: Duration,
    /// Time allowed for an HTTP/1.1 client to send request headers, including the
    /// idle time of a kept-alive connection before its next request. Longer than the
    /// API server's idle-connection timeout (90 s): a connection this side closes
    /// while the client picks it for a POST fails that admission call.
    pub header_read_timeout: Duration,
    /// Largest request body: a Pod may be up to the API server's 3 MiB request
    /// limit, and an UPDATE review carries two.
    pub max_body_bytes: usize,
    /// Time given to open connections to finish after shutdown is signalled.
    pub drain_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            reload_interval: Duration::from_secs(10),
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(120),
            max_body_bytes: 8 << 20,
            drain_timeout: Duration::from_secs(15),
        }
    }
}

/// Largest number of concurrent HTTP/2 streams per connection.
const MAX_H2_STREAMS: u32 = 256;
/// HTTP/2 pings on idle connections, so a vanished client frees its slot.
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// Time to wait for a ping's answer before closing the connection.
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest pause after a failed `accept` (e.g. out of file descriptors).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// A bound, not yet running webhook server.
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    store: Arc<CertStore>,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    limits: ServerLimits,
}

/// What request handlers share.
struct State {
    image: String,
    ready: AtomicBool,
    max_body_bytes: usize,
}

impl Server {
    /// Loads the certificate and binds the listen address, with default limits.
    pub async fn bind(cfg: InjectConfig) -> Result<Self, InjectError> {
        Self::bind_with(cfg, ServerLimits::default()).await
    }

    /// Loads the certificate and binds the listen address.
    pub async fn bind_with(cfg: InjectConfig, limits: ServerLimits) -> Result<Self, InjectError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let store = Arc::new(CertStore::load(&cfg.tls_dir, provider.clone())?);
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(store.clone());
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| InjectError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| InjectError::Bind {
            addr: cfg.listen,
            source,
        })?;
        Ok(Server {
            listener,
            local_addr,
            store,
            acceptor: TlsAcceptor::from(Arc::new(tls)),
            state: Arc::new(State {
                image: cfg.sidecar_image,
                ready: AtomicBool::new(true),
                max_body_bytes: limits.max_body_bytes,
            }),
            limits,
        })
    }

    /// The bound address (useful when the port was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` completes, then drains open connections.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), InjectError> {
        let Server {
            listener,
            local_addr,
            store,
            acceptor,
            state,
            limits,
        } = self;
        tracing::info!(addr = %local_addr, tls_dir = %store.dir().display(), image = %state.image, "ferry-inject is serving admission reviews.");
        let reloader = tokio::spawn(reload_loop(store, limits.reload_interval));

        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_H2_STREAMS)
            .keep_alive_interval(Some(H2_KEEP_ALIVE_INTERVAL))
            .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT);

        let graceful = GracefulShutdown::new();
        let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
        let mut backoff = Duration::from_millis(10);
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                () = &mut shutdown => break,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break, // the semaphore is never closed
                },
            };
            let (tcp, peer) = tokio::select! {
                () = &mut shutdown => break,
                r = listener.accept() => match r {
                    Ok(v) => v,
                    Err(error) => {
                        tracing::warn!(%error, "Accepting a connection failed; backing off.");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                        continue;
                    }
                },
            };
            backoff = Duration::from_millis(10);
            let _ = tcp.set_nodelay(true);

            let acceptor = acceptor.clone();
            let builder = builder.clone();
            let state = state.clone();
            let watcher = graceful.watcher();
            let handshake_timeout = limits.handshake_timeout;
            tokio::spawn(async move {
                let _permit = permit;
                let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, %error, "TLS handshake failed.");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out.");
                        return;
                    }
                };
                let service = hyper::service::service_fn(move |req| handle(req, state.clone()));
                let conn = builder.serve_connection(TokioIo::new(tls), service);
                if let Err(error) = watcher.watch(conn.into_owned()).await {
                    tracing::debug!(%peer, %error, "Connection ended with an error.");
                }
            });
        }

        state.ready.store(false, Ordering::SeqCst);
        drop(listener);
        reloader.abort();
        tracing::info!("ferry-inject is shutting down; draining open connections.");
        if tokio::time::timeout(limits.drain_timeout, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(timeout = ?limits.drain_timeout, "Some connections did not drain in time.");
        }
        Ok(())
    }
}

/// Polls the TLS directory and swaps in a rotated certificate.
async fn reload_loop(store: Arc<CertStore>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate; the files were just loaded
    loop {
        tick.tick().await;
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.reload()).await {
            Ok(Ok(true)) => {
                tracing::info!(tls_dir = %store.dir().display(), "Loaded a rotated serving certificate.")
            }
            Ok(Ok(false)) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "The serving certificate changed but cannot be loaded; keeping the previous one.")
            }
            Err(error) => tracing::warn!(%error, "The certificate reload task failed."),
        }
    }
}

type Body = Full<Bytes>;

async fn handle(req: Request<Incoming>, state: Arc<State>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path();
    Ok(match (req.method(), path) {
        (&Method::POST, "/mutate") => mutate(req, &state).await,
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => {
            if state.ready.load(Ordering::SeqCst) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
            }
        }
        (_, "/mutate" | "/healthz" | "/readyz") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: the webhook path is /mutate\n",
        ),
    })
}

async fn mutate(req: Request<Incoming>, state: &State) -> Response<Body> {
    let body = match Limited::new(req.into_body(), state.max_body_bytes)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("request body exceeds {} bytes\n", state.max_body_bytes),
            );
        }
        Err(error) => {
            tracing::debug!(%error, "Reading a request body failed.");
            return text(StatusCode::BAD_REQUEST, "cannot read the request body\n");
        }
    };
    match review::review(&body, &state.image) {
        Ok(r) => {
            match r.decision {
                Decision::Injected => {
                    tracing::info!(uid = %r.uid, pod = %r.pod, detail = %r.detail, "Injected the ferry sidecar.")
                }
                Decision::Denied => {
                    tracing::info!(uid = %r.uid, pod = %r.pod, reason = %r.detail, "Denied a pod.")
                }
                Decision::Unchanged => {
                    tracing::debug!(uid = %r.uid, pod = %r.pod, detail = %r.detail, "Allowed a pod unchanged.")
                }
            }
            let mut resp = Response::new(Full::new(Bytes::from(r.body)));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp
        }
        Err(error) if error.is_bad_request() => {
            tracing::warn!(%error, "Refused a malformed admission request.");
            text(StatusCode::BAD_REQUEST, &format!("{error}\n"))
        }
        Err(error) => {
            tracing::error!(%error, "Answering an admission request failed.");
            text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{error}\n"))
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::copy_from_slice(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
