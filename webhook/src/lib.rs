//! podwire-injector: the slim mutating webhook. The decision and the patch come from
//! `podwire_core::inject`; this crate reads AdmissionReviews and config files and answers.
//!
//! [`review`] is the whole webhook as a pure function: `podwire-injector review` is a thin
//! wrapper around it, and so is the HTTPS `POST /inject` handler.
#![forbid(unsafe_code)]

pub mod admission;
pub mod config;
pub mod review;

pub use admission::{AdmissionResponse, AdmissionReview, Status};
pub use config::{load_config, parse_config, parse_namespace_labels, LoadedConfig};
pub use review::{review, review_detailed, Outcome, Reviewed};

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
}
