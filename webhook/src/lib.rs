//! podwire-injector: the slim mutating webhook. The decision and the patch come from
//! `podwire_core::inject`; this crate reads AdmissionReviews and config files and answers.
//!
//! [`review`] is the whole webhook as a pure function: `podwire-injector review` is a thin
//! wrapper around it, and so is the HTTPS `POST /inject` handler ([`serve`]).
//!
//! `podwire-injector serve` is made of: [`serve`] (hyper 1 + tokio-rustls, HTTP/1.1: `/inject`,
//! `/healthz`, `/readyz`, `/metrics`, body limit and timeouts), [`tls`] (the hot-swapped serving
//! certificate, from files or the Secret), [`certs`] (the self-managed CA and serving
//! certificate: creation and rotation rules), [`selfmanaged`] (Lease, Secret, caBundle patch
//! through `kube`), [`namespaces`] (namespace labels from a watch) and [`metrics`].
#![forbid(unsafe_code)]

pub mod admission;
pub mod certs;
pub mod config;
pub mod filewatch;
pub mod istio_settings;
pub mod memo;
pub mod metrics;
pub mod namespaces;
pub mod nodes;
pub mod review;
pub mod selfmanaged;
pub mod serve;
pub mod tls;

pub use admission::{AdmissionResponse, AdmissionReview, Status};
pub use config::{
    load_config, load_istio_setting, parse_config, parse_istio_setting, parse_namespace_labels,
    with_istio_settings, IstioSetting, LoadedConfig,
};
pub use review::{review, review_detailed, review_resolving, Outcome, Reviewed};

use thiserror::Error;

/// What can stop the injector before it answers anything (a review itself never fails: every
/// problem with a request becomes an AdmissionReview answer).
#[derive(Debug, Error)]
pub enum Error {
    #[error("cannot read config file {path}: {source}")]
    ConfigRead {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid YAML for the injector config: {source}")]
    ConfigParse {
        path: String,
        source: serde_yaml_ng::Error,
    },
    #[error("config file {path}: {reason}")]
    ConfigShape { path: String, reason: String },
    #[error("config file {path}: {source}")]
    ConfigInvalid {
        path: String,
        source: podwire_core::Error,
    },
    #[error("--namespace-labels: {0}")]
    NamespaceLabels(String),
    #[error("{what}: {reason}")]
    Tls { what: String, reason: String },
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    /// A Kubernetes API call failed; `what` says which and what it was for.
    #[error("{what}: {message}")]
    Kube { what: String, message: String },
}
