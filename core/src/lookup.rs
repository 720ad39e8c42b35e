//! The plugin ↔ agent look-up protocol (version 1) over the agent's Unix socket.
//!
//! One request per connection: the plugin writes one JSON line, the agent answers one JSON
//! line and closes. Small and synchronous on the plugin side; versioned so either side can
//! refuse a peer it does not understand.

use crate::PodInfo;
use serde::{Deserialize, Serialize};

pub const PROTOCOL_VERSION: u32 = 1;
/// Requests and answers larger than this are refused (a pod slice is a few KiB).
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LookupRequest {
    pub v: u32,
    pub namespace: String,
    pub name: String,
    /// When set, a cached pod with another UID is a different (older) pod: not an answer.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "camelCase")]
pub enum LookupStatus {
    Found {
        pod: Box<PodInfo>,
    },
    NotFound,
    /// The agent's source has not synced yet: the answer would be a guess.
    NotReady {
        message: String,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LookupResponse {
    pub v: u32,
    #[serde(flatten)]
    pub status: LookupStatus,
}

impl LookupResponse {
    pub fn new(status: LookupStatus) -> Self {
        LookupResponse {
            v: PROTOCOL_VERSION,
            status,
        }
    }
}

/// Does this cached pod answer the request? (UIDs compared only when both are known.)
pub fn matches(pod: &PodInfo, req: &LookupRequest) -> bool {
    pod.namespace() == req.namespace
        && pod.metadata.name == req.name
        && (req.uid.is_empty() || pod.metadata.uid.is_empty() || pod.metadata.uid == req.uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        let r = LookupResponse::new(LookupStatus::NotFound);
        assert_eq!(
            serde_json::to_string(&r).expect("json"),
            r#"{"v":1,"status":"notFound"}"#
        );
        let r: LookupResponse =
            serde_json::from_str(r#"{"v":1,"status":"found","pod":{"metadata":{"name":"a"}}}"#)
                .expect("parse");
        assert!(matches!(r.status, LookupStatus::Found { .. }));
    }

    #[test]
    fn uid_mismatch_is_not_an_answer() {
        let mut pod = PodInfo::default();
        pod.metadata.name = "a".into();
        pod.metadata.uid = "old".into();
        let mut req = LookupRequest {
            v: 1,
            namespace: "default".into(),
            name: "a".into(),
            uid: "new".into(),
        };
        assert!(!matches(&pod, &req));
        req.uid.clear();
        assert!(matches(&pod, &req));
    }
}
