use thiserror::Error;

/// Everything that can go wrong while turning a pod into rules.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// A `traffic.sidecar.istio.io/*` (or similar) annotation holds a value podwire refuses to render.
    #[error(
        "annotation {key}={value:?} is invalid: {reason}; fix or remove the annotation on the pod"
    )]
    InvalidAnnotation {
        key: String,
        value: String,
        reason: String,
    },
    /// The proxy container's securityContext has an unusable uid/gid.
    #[error("container {container}: securityContext.{field} = {value} is not usable as the proxy's owner match: {reason}")]
    InvalidOwner {
        container: String,
        field: &'static str,
        value: i64,
        reason: &'static str,
    },
    /// The injector's configuration file holds a value podwire refuses to use.
    #[error("injector config: {field}: {reason}")]
    InvalidConfig { field: String, reason: String },
    /// The object handed to the injector is not a readable Pod (or pod template).
    #[error("not a readable pod: {reason}")]
    InvalidPod { reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
