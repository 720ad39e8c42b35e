//! The plugin's one error type, and its mapping onto the CNI spec's error codes.

use podwire_core::cni::{code, CniError};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PluginError {
    #[error("environment variable {var} {reason}")]
    InvalidEnv { var: &'static str, reason: String },
    #[error("cannot decode the network configuration on stdin: {0}")]
    Decode(String),
    #[error("network configuration field {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("cniVersion {version:?} is not supported by podwire-cni ({reason})")]
    IncompatibleVersion { version: String, reason: String },
    #[error("pod {pod}: {source}")]
    InvalidPod {
        pod: String,
        #[source]
        source: podwire_core::Error,
    },
    #[error("pod {pod}: cannot tell whether it is a mesh pod ({reason}); failurePolicy is closed, so the pod must not start un-redirected: make sure podwire-agent is running on this node (socket {socket}), the runtime will retry")]
    Undeterminable {
        pod: String,
        reason: String,
        socket: String,
    },
    #[error("network namespace {path}: {reason}")]
    Netns { path: String, reason: String },
    #[error("pod {pod}: {family} redirection failed in netns {netns}: {reason}")]
    Redirect {
        pod: String,
        family: &'static str,
        netns: String,
        reason: String,
    },
    #[error("pod {pod}: redirection rules are not as expected in netns {netns}: {problems}")]
    CheckFailed {
        pod: String,
        netns: String,
        problems: String,
    },
    #[error("{0}")]
    Io(String),
    #[error("podwire-cni is not ready: {0}")]
    NotAvailable(String),
}

impl PluginError {
    pub fn code(&self) -> u32 {
        match self {
            PluginError::InvalidEnv { .. } => code::INVALID_ENV,
            PluginError::Decode(_) => code::DECODE_FAILURE,
            PluginError::InvalidConfig { .. } | PluginError::InvalidPod { .. } => {
                code::INVALID_CONFIG
            }
            PluginError::IncompatibleVersion { .. } => code::INCOMPATIBLE_VERSION,
            PluginError::Undeterminable { .. } => code::TRY_AGAIN_LATER,
            PluginError::Netns { .. } => code::CONTAINER_UNKNOWN,
            PluginError::Redirect { .. } | PluginError::CheckFailed { .. } => code::REDIRECT_FAILED,
            PluginError::Io(_) => code::IO_FAILURE,
            PluginError::NotAvailable(_) => code::NOT_AVAILABLE,
        }
    }

    /// The error object, in `cni_version` (the config's, so the runtime can decode it).
    pub fn to_cni(&self, cni_version: &str) -> CniError {
        let short = match self {
            PluginError::InvalidEnv { .. } => "invalid environment",
            PluginError::Decode(_) => "failed to decode network configuration",
            PluginError::InvalidConfig { .. } => "invalid network configuration",
            PluginError::InvalidPod { .. } => "invalid pod traffic annotation",
            PluginError::IncompatibleVersion { .. } => "incompatible CNI version",
            PluginError::Undeterminable { .. } => "pod look-up failed, try again later",
            PluginError::Netns { .. } => "network namespace unavailable",
            PluginError::Redirect { .. } => "traffic redirection failed",
            PluginError::CheckFailed { .. } => "traffic redirection check failed",
            PluginError::Io(_) => "I/O failure",
            PluginError::NotAvailable(_) => "plugin not available",
        };
        let mut e = CniError::new(self.code(), format!("podwire-cni: {short}: {self}"));
        e.cni_version = cni_version.to_string();
        e
    }
}

pub type Result<T, E = PluginError> = std::result::Result<T, E>;
