//! ferry-inject: the mutating admission webhook behind `ferry inject`.
//!
//! This is the Kubernetes edge of ferry, independent of the replication engine. A pod
//! labelled `ferry.io/inject: "true"` reaches [`mutate`], which reads its `ferry.io/*`
//! annotations ([`settings`]), checks them against the pod, and answers with targeted
//! JSON Patch operations that add the ferry sidecar (a native sidecar by default), the
//! TLS Secret volume and a `ferry.io/status` annotation. The
//! raw Pod JSON is never re-serialised, so fields our Kubernetes types do not know
//! survive. [`serve`] wraps that pure function in a hyper + rustls HTTPS server that
//! speaks HTTP/1.1 and HTTP/2 and picks up a rotated certificate without a restart.
//!
//! Start reading at [`review::review`] (request in, response out), then `plan.rs`
//! (the decision and the patch) and `sidecar.rs` (the container).
//!
//! Architecture invariants: nothing here does I/O except `server.rs` and `tls.rs`;
//! bad input is a denial or an HTTP 400, never a panic.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
pub mod ordinal;
mod plan;
mod pod;
mod quantity;
mod review;
mod server;
pub mod settings;
mod sidecar;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;

pub use error::{InjectError, ReviewError};
pub use review::{mutate, review, Decision, Reviewed};
pub use server::{Server, ServerLimits};
pub use sidecar::{
    CONTAINER_NAME, METRICS_PORT_NAME, QUIC_PORT_NAME, ROOT_MOUNT, TLS_MOUNT, TLS_VOLUME,
};
pub use tls::{CERT_FILE, KEY_FILE};

/// The sidecar image injected when neither `--sidecar-image` nor the pod's
/// `ferry.io/image` annotation names one: this release of ferry.
pub const DEFAULT_SIDECAR_IMAGE: &str =
    concat!("ghcr.io/ferry-io/ferry:", env!("CARGO_PKG_VERSION"));

/// Settings of `ferry inject`.
#[derive(Debug, Clone)]
pub struct InjectConfig {
    /// Address to listen on (HTTPS).
    pub listen: SocketAddr,
    /// Directory in cert-manager's Secret layout: `tls.crt`, `tls.key` (PKCS#1,
    /// PKCS#8 or SEC1 PEM) and `ca.crt` (not needed to serve).
    pub tls_dir: PathBuf,
    /// Image of the injected sidecar, unless a pod's `ferry.io/image` says otherwise.
    pub sidecar_image: String,
}

/// Runs the webhook until `shutdown` completes, then drains open connections.
///
/// Fails at start if the certificate cannot be loaded or the address bound; once
/// serving, errors are per connection and are logged.
///
/// ```no_run
/// # async fn main_() -> Result<(), ferry_inject::InjectError> {
/// use ferry_inject::{serve, InjectConfig, DEFAULT_SIDECAR_IMAGE};
///
/// let cfg = InjectConfig {
///     listen: std::net::SocketAddr::from(([0, 0, 0, 0], 8443)),
///     tls_dir: "/etc/ferry-inject/tls".into(),
///     sidecar_image: DEFAULT_SIDECAR_IMAGE.to_owned(),
/// };
/// serve(cfg, async {
///     let _ = tokio::signal::ctrl_c().await; // or SIGTERM
/// })
/// .await
/// # }
/// ```
pub async fn serve(
    cfg: InjectConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), InjectError> {
    Server::bind(cfg).await?.run(shutdown).await
}
