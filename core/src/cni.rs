//! CNI spec types shared by the plugin and its tests: versions, error codes, the error
//! object, and `CNI_ARGS` parsing.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The version podwire speaks, and every version whose configs it accepts.
pub const CNI_VERSION: &str = "1.1.0";
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Error codes from the CNI spec ("Error" section).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const CONTAINER_UNKNOWN: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const LIMITED_CONNECTIVITY: u32 = 51;
    /// Plugin-specific errors start at 100.
    pub const REDIRECT_FAILED: u32 = 100;
    pub const POD_REJECTED: u32 = 101;
}

/// The error object a plugin prints on stdout with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniError {
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            cni_version: CNI_VERSION.to_string(),
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

pub fn version_supported(v: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&v)
}

/// `CNI_ARGS`: `K1=V1;K2=V2`. Returns the pairs, or what is wrong (an item that is not
/// KEY=VALUE). A key given twice keeps its last value, as libcni's parser does (see
/// [`conflicting_pod_key`]).
pub fn parse_cni_args(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for item in s.split(';').filter(|i| !i.is_empty()) {
        match item.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                out.insert(k.to_string(), v.to_string());
            }
            _ => return Err(format!("item {item:?} is not KEY=VALUE")),
        }
    }
    Ok(out)
}

/// A `K8S_POD_*` key given twice with different values: which pod is meant cannot be told.
/// (Other keys may repeat, e.g. a runtime's `IgnoreUnknown` beside a user's.)
pub fn conflicting_pod_key(s: &str) -> Option<String> {
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for (k, v) in s.split(';').filter_map(|i| i.split_once('=')) {
        if !k.starts_with("K8S_POD_") {
            continue;
        }
        if let Some(before) = seen.insert(k, v) {
            if before != v {
                return Some(format!("{k} is given twice, as {before:?} and {v:?}"));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args() {
        let a =
            parse_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;").expect("valid");
        assert_eq!(a.get("K8S_POD_NAME").map(String::as_str), Some("p"));
        assert_eq!(
            parse_cni_args("K8S_POD_NAME"),
            Err("item \"K8S_POD_NAME\" is not KEY=VALUE".into())
        );
        assert_eq!(
            conflicting_pod_key("K8S_POD_NAME=a;K8S_POD_NAME=b"),
            Some("K8S_POD_NAME is given twice, as \"a\" and \"b\"".into())
        );
        assert_eq!(conflicting_pod_key("K8S_POD_NAME=a;K8S_POD_NAME=a"), None);
        assert_eq!(
            conflicting_pod_key("IgnoreUnknown=1;IgnoreUnknown=true"),
            None
        );
        assert_eq!(parse_cni_args("").expect("empty ok").len(), 0);
    }

    #[test]
    fn error_json_shape() {
        let e = CniError::new(code::INVALID_CONFIG, "bad").with_details("d");
        assert_eq!(
            serde_json::to_value(&e).expect("json"),
            serde_json::json!({"cniVersion":"1.1.0","code":7,"msg":"bad","details":"d"})
        );
    }
}
