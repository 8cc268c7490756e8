//! The crate's errors: one enum per operation a caller can act on.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Why an AdmissionReview could not be answered. The server turns each into an
/// HTTP status (400 for the request's faults, 500 for [`ReviewError::Internal`]);
/// a pod that is merely wrong is a denial, not an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReviewError {
    /// The body is not JSON.
    #[error("the request body is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    /// The body is JSON but not an `admission.k8s.io/v1` AdmissionReview.
    #[error(
        "expected apiVersion \"admission.k8s.io/v1\" and kind \"AdmissionReview\", got {api_version:?} and {kind:?} \
         (set admissionReviewVersions: [v1] in the webhook configuration)"
    )]
    NotAdmissionReview {
        /// The `apiVersion` found (empty if absent).
        api_version: String,
        /// The `kind` found (empty if absent).
        kind: String,
    },
    /// An AdmissionReview whose fields have the wrong shape.
    #[error("malformed AdmissionReview: {0}")]
    Malformed(#[source] serde_json::Error),
    /// An AdmissionReview without a `request`.
    #[error("the AdmissionReview has no request")]
    NoRequest,
    /// A Pod CREATE without `request.object`.
    #[error("the AdmissionReview request has no object")]
    NoObject,
    /// `request.object` is not shaped like a Pod.
    #[error("request.object is not a valid Pod: {0}")]
    NotAPod(#[source] serde_json::Error),
    /// Building the response failed: a bug, not the request's fault.
    #[error("internal error building the response: {0}")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ReviewError {
    /// Whether the request is at fault (HTTP 400) rather than the webhook (500).
    pub fn is_bad_request(&self) -> bool {
        !matches!(self, ReviewError::Internal(_))
    }
}

/// Why the webhook server could not start or keep running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InjectError {
    /// A TLS file could not be read.
    #[error("cannot read {path}: {source}")]
    ReadTls {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A TLS file was read but holds no usable certificate or key.
    #[error("{path}: {reason}")]
    BadTls {
        /// The file (or directory, for a certificate/key mismatch).
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}
