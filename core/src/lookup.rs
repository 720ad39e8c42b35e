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
    /// When set, a held pod with another UID is another incarnation: the answer is then
    /// `notReady` (unknown), never `notFound`.
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

/// How a pod held by a source relates to a request for the same namespace/name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodMatch {
    /// The pod asked for (UIDs equal, or one of them unknown).
    Same,
    /// Same name, another UID: the source holds another incarnation (a re-created pod the
    /// source has not caught up with, or one it already knows but the runtime does not).
    /// Never an answer, and never "not a mesh pod" either: the status is unknown.
    OtherUid { held: String },
    /// Another namespace or name.
    Different,
}

/// Does this held pod answer the request? (UIDs compared only when both are known.)
pub fn pod_match(pod: &PodInfo, req: &LookupRequest) -> PodMatch {
    if pod.namespace() != req.namespace || pod.metadata.name != req.name {
        PodMatch::Different
    } else if req.uid.is_empty() && pod.metadata.deletion_timestamp.is_some() {
        // The runtime names no UID and the held pod is going away: what is set up may be its
        // re-created successor (a StatefulSet's), which the old pod cannot answer for.
        PodMatch::OtherUid {
            held: pod.metadata.uid.clone(),
        }
    } else if req.uid.is_empty() || pod.metadata.uid.is_empty() || pod.metadata.uid == req.uid {
        PodMatch::Same
    } else {
        PodMatch::OtherUid {
            held: pod.metadata.uid.clone(),
        }
    }
}

/// The answer when a source holds `namespace/name` with another UID than asked for: unknown
/// (`notReady`, so a v1 plugin fails closed and the runtime retries), saying why. `source`
/// names who holds the other UID ("the pod directory", "the API server").
pub fn other_uid(req: &LookupRequest, held: &str, source: &str) -> LookupStatus {
    LookupStatus::NotReady {
        message: other_uid_reason(req, held, source),
    }
}

/// Why [`other_uid`] cannot answer, for whoever reports it (the agent, the plugin's own GET).
pub fn other_uid_reason(req: &LookupRequest, held: &str, source: &str) -> String {
    if req.uid.is_empty() {
        return format!(
            "{source} holds pod {}/{} (UID {held}) being deleted, and the runtime does not say \
             which UID it is setting up: it may be a re-created pod of the same name (retry \
             once the old pod is gone)",
            req.namespace, req.name
        );
    }
    format!(
        "{source} holds pod {}/{} with UID {held}, but the runtime is setting up UID {}: the \
         source has not caught up with a re-created pod yet (retry), or the runtime is setting \
         up a pod that no longer exists",
        req.namespace, req.name, req.uid
    )
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
    fn uid_mismatch_is_unknown_never_not_found() {
        let mut pod = PodInfo::default();
        pod.metadata.name = "a".into();
        pod.metadata.uid = "old".into();
        let mut req = LookupRequest {
            v: 1,
            namespace: "default".into(),
            name: "a".into(),
            uid: "new".into(),
        };
        assert_eq!(
            pod_match(&pod, &req),
            PodMatch::OtherUid { held: "old".into() }
        );
        assert!(matches!(
            other_uid(&req, "old", "the pod directory"),
            LookupStatus::NotReady { message } if message.contains("UID old") && message.contains("UID new")
        ));
        req.uid.clear();
        assert_eq!(pod_match(&pod, &req), PodMatch::Same);
        // No UID from the runtime, and the held pod is being deleted: not an answer.
        let mut going = pod.clone();
        going.metadata.deletion_timestamp = Some("2026-12-03T10:00:00Z".into());
        let anonymous = LookupRequest {
            uid: String::new(),
            ..req.clone()
        };
        assert!(matches!(
            pod_match(&going, &anonymous),
            PodMatch::OtherUid { .. }
        ));
        match other_uid(&anonymous, &going.metadata.uid, "the node's pod cache") {
            LookupStatus::NotReady { message } => {
                assert!(message.contains("being deleted"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        // With its UID named, the runtime is setting up that pod: the UIDs decide.
        let named = LookupRequest {
            uid: "old".into(),
            ..req.clone()
        };
        assert_eq!(pod_match(&going, &named), PodMatch::Same);
        req.name = "b".into();
        assert_eq!(pod_match(&pod, &req), PodMatch::Different);
    }
}
