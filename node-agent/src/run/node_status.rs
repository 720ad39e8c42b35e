//! What the Node shows about podwire: the `PodwireReady` condition, and the startup taint the
//! agent removes once ready.

use super::api_call;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use podwire_core::node::{CONDITION, REASON_NOT_READY, REASON_READY, STARTUP_TAINT};
use serde_json::json;
use tracing::{info, warn};

pub async fn patch_condition(
    nodes: &Api<Node>,
    node: &str,
    ready: bool,
    message: &str,
) -> Result<(), String> {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let patch = json!({"status": {"conditions": [{
        "type": CONDITION,
        "status": if ready { "True" } else { "False" },
        "reason": if ready { REASON_READY } else { REASON_NOT_READY },
        "message": message,
        "lastHeartbeatTime": now,
        "lastTransitionTime": now,
    }]}});
    api_call(
        &format!("PATCH node {node} status ({CONDITION})"),
        nodes.patch_status(node, &PatchParams::default(), &Patch::Strategic(patch)),
    )
    .await
    .map(|_| ())
}

/// Remove the startup taint; true once it is gone.
pub async fn remove_taint(nodes: &Api<Node>, node: &str) -> bool {
    let n = match api_call(&format!("GET node {node}"), nodes.get(node)).await {
        Ok(n) => n,
        Err(e) => {
            warn!("removing the {STARTUP_TAINT} taint: {e}");
            return false;
        }
    };
    let taints = n.spec.and_then(|s| s.taints).unwrap_or_default();
    if !taints.iter().any(|t| t.key == STARTUP_TAINT) {
        return true;
    }
    let kept: Vec<_> = taints
        .into_iter()
        .filter(|t| t.key != STARTUP_TAINT)
        .collect();
    let patch = json!({"spec": {"taints": kept}});
    match api_call(
        &format!("PATCH node {node} taints"),
        nodes.patch(node, &PatchParams::default(), &Patch::Merge(patch)),
    )
    .await
    {
        Ok(_) => {
            info!("removed the {STARTUP_TAINT} taint from node {node}");
            true
        }
        Err(e) => {
            warn!("removing the {STARTUP_TAINT} taint from node {node}: {e}");
            false
        }
    }
}
