//! The agent's one error type. `main` adds context with anyhow; everything below it returns this.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pods directory cannot be listed (missing, unreadable, ...).
    #[error("pods directory {}: {source}", path.display())]
    PodsDir { path: PathBuf, source: io::Error },

    #[error("pods directory {} is not a directory", path.display())]
    NotADirectory { path: PathBuf },

    #[error("cannot watch pods directory {}: {source}", path.display())]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },

    /// One manifest file could not be read; the other files still load.
    #[error("cannot read manifest {}: {source}", path.display())]
    ReadFile { path: PathBuf, source: io::Error },

    #[error("manifest {} is larger than {limit} bytes: skipped", path.display())]
    FileTooLarge { path: PathBuf, limit: u64 },

    /// One document of a manifest file is not usable; the other documents still load.
    #[error("manifest {} document {index} (from line {line}): {message}", path.display())]
    Document {
        path: PathBuf,
        /// 1-based, counting the non-empty documents of the file.
        index: usize,
        /// 1-based line where the document starts.
        line: usize,
        message: String,
        /// (namespace, name) of the pod the document defines, when it can be told.
        pod: Option<(String, String)>,
    },

    /// A socket set-up step failed; `action` says which ("bind", "chmod", ...).
    #[error("socket {}: cannot {action}: {source}", path.display())]
    Socket {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },

    #[error("{} exists and is not a socket: refusing to replace it", path.display())]
    NotASocket { path: PathBuf },

    #[error("another process is already serving on {}", path.display())]
    SocketInUse { path: PathBuf },

    /// A Kubernetes API call (or client set-up) failed; `what` says which.
    #[error("{what}: {message}")]
    Kube { what: String, message: String },

    /// Installing or uninstalling the plugin failed on this file.
    #[error("{}: {message}", path.display())]
    Install { path: PathBuf, message: String },

    #[error("cannot install the {signal} handler: {source}")]
    Signal {
        signal: &'static str,
        source: io::Error,
    },
}

impl Error {
    /// The pod an unreadable document is about, when its namespace/name could be recovered.
    pub fn pod(&self) -> Option<(&str, &str)> {
        match self {
            Error::Document {
                pod: Some((namespace, name)),
                ..
            } => Some((namespace, name)),
            _ => None,
        }
    }
}
