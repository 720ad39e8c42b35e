//! One AdmissionReview in, the answer out: the whole webhook as a pure function.
//!
//! Every input gets a proper AdmissionReview answer, never a panic:
//! - not JSON / not an `admission.k8s.io/v1` AdmissionReview / unreadable pod: denied with a
//!   status message (fail closed, as the webhook's failurePolicy would);
//! - another kind than Pod, a subresource, an operation other than CREATE: allowed unchanged
//!   (a kind other than Pod with a warning: the webhook's rules are wrong);
//! - a pod podwire refuses to inject (bad traffic or resource annotation): denied, naming the
//!   annotation and its value;
//! - otherwise allowed, with the JSON patch when injecting and warnings when the outcome would
//!   surprise the pod's author.

use crate::admission::{
    AdmissionRequest, AdmissionResponse, AdmissionReview, Status, API_VERSION, KIND,
};
use podwire_core::inject::{plan, InjectorConfig, Labels, Step};
use podwire_core::MeshProfile;
use serde::Deserialize;
use serde_json::Value;

/// Prefix of every warning, so `kubectl` users know who is speaking.
const WARNING_PREFIX: &str = "podwire: ";

/// What happened, for logs and metrics (the future HTTPS handler records it; `review` prints
/// the answer only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    Skipped,
    /// Denied: the pod asks for something podwire refuses.
    Refused,
    /// Not a pod creation: allowed unchanged.
    Ignored,
    /// Not a readable AdmissionReview or pod: denied.
    Malformed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Injected => "injected",
            Outcome::Skipped => "skipped",
            Outcome::Refused => "refused",
            Outcome::Ignored => "ignored",
            Outcome::Malformed => "malformed",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Reviewed {
    pub review: AdmissionReview,
    pub outcome: Outcome,
    /// The decision's step, when a decision was made.
    pub step: Option<Step>,
    /// One line for the log: `shop/web-<generated>: injected: policy is enabled ...`.
    pub summary: String,
    /// The request was a dry run: the answer is the same, but a caller must not count it as a
    /// pod created (no metrics, no events).
    pub dry_run: bool,
}

/// The AdmissionReview `/inject` answers to `req_json`. `namespace_labels`: the labels of the
/// pod's namespace when known (then the webhook's namespaceSelector is checked here too).
pub fn review(
    req_json: &[u8],
    cfg: &InjectorConfig,
    namespace_labels: Option<&Labels>,
) -> AdmissionReview {
    review_detailed(req_json, cfg, namespace_labels, &MeshProfile::istio()).review
}

pub fn review_detailed(
    req_json: &[u8],
    cfg: &InjectorConfig,
    namespace_labels: Option<&Labels>,
    profile: &MeshProfile,
) -> Reviewed {
    review_resolving(req_json, cfg, &|_| namespace_labels.cloned(), profile)
}

/// [`review_detailed`] for a server that knows many namespaces: `labels_of(namespace)` gives
/// the labels of the request's namespace when known (a namespace watch), `None` otherwise
/// (then the namespaceSelector is left to the API server, as `review` does with no labels).
pub fn review_resolving(
    req_json: &[u8],
    cfg: &InjectorConfig,
    labels_of: &dyn Fn(&str) -> Option<Labels>,
    profile: &MeshProfile,
) -> Reviewed {
    let req = match read_request(req_json) {
        Ok(r) => r,
        Err((uid, message)) => {
            return finish(
                deny(uid, 400, "BadRequest", &message, Vec::new()),
                Outcome::Malformed,
                None,
                message,
                false,
            )
        }
    };
    let dry_run = req.dry_run.unwrap_or(false);
    // Only built for messages (not on the hot path of a pod creation).
    let who = || {
        format!(
            "{} {}",
            req.kind.display(),
            object_name(&req.namespace, &req.name, req.object.as_ref())
        )
    };
    let allow_unchanged = |warnings: Vec<String>, summary: String| {
        finish(
            AdmissionResponse {
                uid: req.uid.clone(),
                allowed: true,
                warnings: prefixed(warnings),
                ..Default::default()
            },
            Outcome::Ignored,
            None,
            summary,
            dry_run,
        )
    };
    // A request that cannot be read is denied as a bad request, naming what is wrong.
    let malformed = |msg: String| {
        finish(
            deny(req.uid.clone(), 400, "BadRequest", &msg, Vec::new()),
            Outcome::Malformed,
            None,
            format!("{}: {msg}", who()),
            dry_run,
        )
    };
    // The API server always names the kind: a request without one is malformed, not "some
    // other kind" to let through unchanged.
    if req.kind.kind.is_empty() {
        return malformed("request.kind is missing: cannot tell what is being admitted".into());
    }
    if req.kind.kind != "Pod" || !req.kind.group.is_empty() {
        let msg = format!(
            "the injector only mutates Pods; {} was not changed (check the webhook's rules)",
            who()
        );
        return allow_unchanged(vec![msg.clone()], msg);
    }
    if !req.sub_resource.is_empty() {
        return allow_unchanged(
            Vec::new(),
            format!("{}: subresource {} ignored", who(), req.sub_resource),
        );
    }
    // Containers cannot be added after creation; only CREATE is ever mutated.
    if req.operation != "CREATE" {
        return allow_unchanged(
            Vec::new(),
            format!("{}: operation {} ignored", who(), req.operation),
        );
    }
    let Some(object) = req.object.as_ref() else {
        return malformed("request.object is missing: no pod to inject".to_string());
    };
    let ns = (!req.namespace.is_empty()).then_some(req.namespace.as_str());
    // The request's namespace is where the pod is created; an object naming another (which
    // the API server itself refuses) would be decided on the other's rules.
    let own_ns = object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty());
    if let (Some(req_ns), Some(own)) = (ns, own_ns) {
        if req_ns != own {
            return malformed(format!(
                "the object's metadata.namespace {own:?} does not match the request's namespace \
                 {req_ns:?}"
            ));
        }
    }
    let namespace_labels = labels_of(ns.or(own_ns).unwrap_or(""));
    let plan = match plan(object, ns, namespace_labels.as_ref(), cfg, profile) {
        Ok(p) => p,
        Err(e) => return malformed(e.to_string()),
    };
    let pod = plan.pod.display_name();
    let d = plan.decision;
    let summary = format!("{pod}: {}", d.reason);
    match plan.patch {
        Err(e) => {
            let msg = format!("sidecar injection refused: {e}");
            finish(
                deny(req.uid, 422, "Invalid", &msg, d.warnings),
                Outcome::Refused,
                Some(d.step),
                format!("{pod}: {msg}"),
                dry_run,
            )
        }
        Ok(ops) if ops.is_empty() => finish(
            AdmissionResponse {
                uid: req.uid,
                allowed: true,
                warnings: prefixed(d.warnings),
                ..Default::default()
            },
            if d.inject {
                Outcome::Injected
            } else {
                Outcome::Skipped
            },
            Some(d.step),
            summary,
            dry_run,
        ),
        Ok(ops) => {
            // Serializing a Vec of plain structs cannot fail; an empty patch would still be valid.
            // Sized once (Istio's sidecar is ~5 KB): no regrowing copies.
            let mut json = Vec::with_capacity(8 << 10);
            if serde_json::to_writer(&mut json, &ops).is_err() {
                json = b"[]".to_vec();
            }
            finish(
                AdmissionResponse {
                    uid: req.uid,
                    allowed: true,
                    patch_type: Some("JSONPatch".into()),
                    patch: Some(base64_simd::STANDARD.encode_to_string(json)),
                    warnings: prefixed(d.warnings),
                    ..Default::default()
                },
                Outcome::Injected,
                Some(d.step),
                summary,
                dry_run,
            )
        }
    }
}

fn finish(
    response: AdmissionResponse,
    outcome: Outcome,
    step: Option<Step>,
    summary: String,
    dry_run: bool,
) -> Reviewed {
    Reviewed {
        review: AdmissionReview::answer(response),
        outcome,
        step,
        summary,
        dry_run,
    }
}

fn deny(
    uid: String,
    code: u16,
    reason: &str,
    message: &str,
    warnings: Vec<String>,
) -> AdmissionResponse {
    AdmissionResponse {
        uid,
        allowed: false,
        status: Some(Status::failure(
            code,
            reason,
            format!("podwire-injector: {message}"),
        )),
        warnings: prefixed(warnings),
        ..Default::default()
    }
}

fn prefixed(warnings: Vec<String>) -> Vec<String> {
    warnings
        .into_iter()
        .map(|w| format!("{WARNING_PREFIX}{w}"))
        .collect()
}

/// The envelope as sent; read in one pass (the pod is only parsed once on the hot path).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", bound(deserialize = "O: Deserialize<'de>"))]
struct Envelope<O = Value> {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    request: Option<AdmissionRequest<O>>,
}

/// The request, or (the uid if one could be found, why not).
/// `O`: how the object is held (the memo reads it raw).
pub(crate) fn read_request<'a, O: Deserialize<'a>>(
    body: &'a [u8],
) -> Result<AdmissionRequest<O>, (String, String)> {
    let env: Envelope<O> = match serde_json::from_slice(body) {
        Ok(env) => env,
        Err(e) if e.is_data() => {
            // Valid JSON of the wrong shape: find the uid so the API server can match the answer.
            let uid = serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| v.pointer("/request/uid")?.as_str().map(String::from))
                .unwrap_or_default();
            return Err((uid, format!("AdmissionReview is not readable: {e}")));
        }
        Err(e) => return Err((String::new(), format!("request body is not JSON: {e}"))),
    };
    let uid = env
        .request
        .as_ref()
        .map(|r| r.uid.clone())
        .unwrap_or_default();
    if env.api_version != API_VERSION || env.kind != KIND {
        return Err((
            uid,
            format!(
                "expected an {API_VERSION} {KIND}, got apiVersion {:?} kind {:?}",
                env.api_version, env.kind
            ),
        ));
    }
    let req = env
        .request
        .ok_or_else(|| (uid.clone(), "AdmissionReview has no request".to_string()))?;
    if req.uid.is_empty() {
        return Err((uid, "AdmissionReview request has no uid".into()));
    }
    Ok(req)
}

/// `namespace/name`, with a generateName prefix when the API server has not named it yet.
fn object_name(namespace: &str, name: &str, object: Option<&Value>) -> String {
    let meta = object.and_then(|o| o.get("metadata"));
    let field = |f: &str| {
        meta.and_then(|m| m.get(f))
            .and_then(Value::as_str)
            .unwrap_or("")
    };
    let name = if !name.is_empty() {
        name.to_string()
    } else if !field("name").is_empty() {
        field("name").to_string()
    } else {
        format!("{}<generated>", field("generateName"))
    };
    let ns = if namespace.is_empty() {
        field("namespace")
    } else {
        namespace
    };
    if ns.is_empty() {
        name
    } else {
        format!("{ns}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Vec<u8> {
        serde_json::to_vec(&v).expect("json")
    }

    fn pod_review(pod: Value) -> Vec<u8> {
        body(json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "resource": {"group": "", "version": "v1", "resource": "pods"},
                        "namespace": "shop", "operation": "CREATE", "object": pod}
        }))
    }

    #[test]
    fn garbage_gets_a_denial_not_a_panic() {
        let cfg = InjectorConfig::default();
        for b in [
            b"".to_vec(),
            b"{".to_vec(),
            b"[]".to_vec(),
            body(
                json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {"uid": "x"}}),
            ),
            body(json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"})),
            body(
                json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"kind": 3}}),
            ),
            body(
                json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": ""}}),
            ),
            // No kind: not "another kind" to let through unchanged.
            body(
                json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                       "request": {"uid": "x", "namespace": "shop", "operation": "CREATE",
                                   "object": {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "app"}]}}}}),
            ),
            // The object in another namespace than the request's (kube-system is never injected).
            pod_review(
                json!({"metadata": {"name": "p", "namespace": "kube-system"},
                              "spec": {"containers": [{"name": "app"}]}}),
            ),
        ] {
            let r = review_detailed(&b, &cfg, None, &MeshProfile::istio());
            assert_eq!(
                r.outcome,
                Outcome::Malformed,
                "{}",
                String::from_utf8_lossy(&b)
            );
            let resp = r.review.response.expect("response");
            assert!(!resp.allowed);
            assert_eq!(resp.status.as_ref().map(|s| s.code), Some(400));
        }
    }

    #[test]
    fn patch_is_base64_json_patch() {
        let r = review(
            &pod_review(
                json!({"metadata": {"generateName": "web-"}, "spec": {"containers": [{"name": "web"}]}}),
            ),
            &InjectorConfig::default(),
            None,
        );
        let resp = r.response.expect("response");
        assert_eq!((resp.uid.as_str(), resp.allowed), ("u-1", true));
        assert_eq!(resp.patch_type.as_deref(), Some("JSONPatch"));
        use base64::Engine;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(resp.patch.expect("patch"))
            .expect("base64");
        let ops: Value = serde_json::from_slice(&raw).expect("json");
        let paths: Vec<&str> = ops
            .as_array()
            .expect("ops")
            .iter()
            .filter_map(|o| o["path"].as_str())
            .collect();
        // Native sidecar layout by default: the proxy is the first init container.
        assert!(paths.contains(&"/spec/initContainers"), "{paths:?}");
        assert!(paths.contains(&"/spec/volumes"), "{paths:?}");
    }

    #[test]
    fn names_for_messages() {
        assert_eq!(
            object_name(
                "shop",
                "",
                Some(&json!({"metadata": {"generateName": "web-"}}))
            ),
            "shop/web-<generated>"
        );
        assert_eq!(object_name("", "x", None), "x");
    }
}
