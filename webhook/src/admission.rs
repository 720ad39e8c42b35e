//! The `admission.k8s.io/v1` AdmissionReview wire format, the parts the injector reads and
//! writes. Requests are read leniently (unknown fields ignored, as the API adds them).

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const API_VERSION: &str = "admission.k8s.io/v1";
pub const KIND: &str = "AdmissionReview";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionReview {
    pub api_version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<AdmissionRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<AdmissionResponse>,
}

impl AdmissionReview {
    /// The answer envelope for `response`.
    pub fn answer(response: AdmissionResponse) -> Self {
        AdmissionReview {
            api_version: API_VERSION.into(),
            kind: KIND.into(),
            request: None,
            response: Some(response),
        }
    }

    /// The review as JSON: the same document as `serde_json::to_vec`, but a patch with nothing
    /// to escape (base64 never has) is copied in whole, as the response's last member. serde_json
    /// checks a string for escapes byte by byte, and on Istio's ~7 KB of base64 that check was
    /// a tenth of a review's time.
    pub fn to_json(&self) -> serde_json::Result<Vec<u8>> {
        // An answer carries no request; anything else takes the plain way.
        let answer = self.response.as_ref().filter(|_| self.request.is_none());
        let Some((r, patch)) = answer.and_then(|r| {
            let patch = r.patch.as_deref().filter(|p| !needs_escape(p))?;
            Some((r, patch))
        }) else {
            return serde_json::to_vec(self);
        };
        // Everything but the patch (no `..r.clone()`: that would copy the patch too).
        let rest = AdmissionReview {
            api_version: self.api_version.clone(),
            kind: self.kind.clone(),
            request: None,
            response: Some(AdmissionResponse {
                uid: r.uid.clone(),
                allowed: r.allowed,
                status: r.status.clone(),
                patch_type: r.patch_type.clone(),
                patch: None,
                warnings: r.warnings.clone(),
            }),
        };
        let mut out = Vec::with_capacity(patch.len() + 512);
        serde_json::to_writer(&mut out, &rest)?;
        // `response` is the review's last member, and a response always has members (uid,
        // allowed): the text ends `}}`.
        out.truncate(out.len().saturating_sub(2));
        out.extend_from_slice(br#","patch":""#);
        out.extend_from_slice(patch.as_bytes());
        out.extend_from_slice(br#""}}"#);
        Ok(out)
    }
}

/// Whether JSON must escape something in `s` (a quote, a backslash, a control character).
/// Folds over every byte without stopping early, so that it compiles to a vector loop.
fn needs_escape(s: &str) -> bool {
    s.bytes().fold(false, |any, b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    })
}

/// `O`: how the object is held, a JSON tree by default (the memo borrows it as raw JSON).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
// A missing object is `None`: no `O: Default` (serde would ask it for the field's default).
#[serde(rename_all = "camelCase", bound(deserialize = "O: Deserialize<'de>"))]
pub struct AdmissionRequest<O = Value> {
    pub uid: String,
    #[serde(default)]
    pub kind: GroupVersionKind,
    #[serde(default)]
    pub resource: GroupVersionResource,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sub_resource: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default)]
    pub operation: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<O>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupVersionKind {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub kind: String,
}

impl GroupVersionKind {
    /// `apps/v1 Deployment`, `v1 Pod`.
    pub fn display(&self) -> String {
        if self.group.is_empty() {
            format!("{} {}", self.version, self.kind)
        } else {
            format!("{}/{} {}", self.group, self.version, self.kind)
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupVersionResource {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub resource: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionResponse {
    pub uid: String,
    pub allowed: bool,
    /// Why a request is denied (`metav1.Status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<String>,
    /// base64 of the RFC 6902 patch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    /// Shown by kubectl as `Warning: ...`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// `Failure` for a denial.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub status: String,
    pub code: u16,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    pub message: String,
}

impl Status {
    pub fn failure(code: u16, reason: &str, message: String) -> Self {
        Status {
            status: "Failure".into(),
            code,
            reason: reason.into(),
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn answer(patch: Option<String>, warnings: Vec<String>, status: bool) -> AdmissionReview {
        AdmissionReview::answer(AdmissionResponse {
            uid: "u-\"1\"".into(),
            allowed: !status,
            status: status.then(|| Status::failure(422, "Invalid", "no \"way\"\n".into())),
            patch_type: patch.as_ref().map(|_| "JSONPatch".into()),
            patch,
            warnings,
        })
    }

    #[test]
    fn a_base64_patch_is_copied_in_whole() {
        let review = answer(Some("W3sib3AiOiJhZGQifV0=".into()), vec!["w".into()], false);
        let json = review.to_json().expect("JSON");
        // The patch went in whole, as the response's last member...
        assert!(
            json.ends_with(br#","patch":"W3sib3AiOiJhZGQifV0="}}"#),
            "{}",
            String::from_utf8_lossy(&json)
        );
        // ...and the document is the one serde_json writes.
        let read: AdmissionReview = serde_json::from_slice(&json).expect("JSON");
        assert_eq!(read, review);
    }

    proptest! {
        /// Any answer, patch or not, escapes needed or not, reads back as itself.
        #[test]
        fn to_json_is_serde_json_s_document(
            patch in proptest::option::of(any::<String>()),
            warnings in proptest::collection::vec(any::<String>(), 0..3),
            status in any::<bool>(),
        ) {
            let review = answer(patch, warnings, status);
            let json = review.to_json().expect("JSON");
            let read: serde_json::Value = serde_json::from_slice(&json).expect("JSON");
            prop_assert_eq!(read, serde_json::to_value(&review).expect("value"));
        }
    }
}
