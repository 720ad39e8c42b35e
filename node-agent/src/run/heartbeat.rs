//! The heartbeat: every period, check the API server, publish the Node condition when it
//! changes, remove the startup taint once ready, and run a repair pass.

use super::{api_call_within, lock, node_status, repair, HeartbeatArgs, State, CHECK_TIMEOUT};
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::Client;
use podwire_core::node::CONDITION;
use std::sync::Arc;
use tracing::warn;

pub async fn run(client: Client, node: String, args: HeartbeatArgs, state: Arc<State>) {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut published: Option<(bool, String)> = None;
    let mut taint_removed = false;
    loop {
        let what = format!("GET node {node}");
        let reachable = match api_call_within(CHECK_TIMEOUT, &what, nodes.get(&node)).await {
            Ok(_) => true,
            Err(e) => {
                warn!("API server check failed: {e}");
                false
            }
        };
        state.metrics.api_reachable.set(reachable);
        let (ready, message) = readiness(&state);
        if reachable && published.as_ref() != Some(&(ready, message.clone())) {
            match node_status::patch_condition(&nodes, &node, ready, &message).await {
                Ok(()) => published = Some((ready, message.clone())),
                Err(e) => warn!("publishing the {CONDITION} condition: {e}"),
            }
        }
        if ready && reachable && args.remove_startup_taint && !taint_removed {
            taint_removed = node_status::remove_taint(&nodes, &node).await;
        }
        if ready {
            repair::pass(&client, &node, &args, &state).await;
        }
        tokio::time::sleep(args.period).await;
    }
}

/// Ready = chained, the cache synced, the API server reachable; otherwise why not.
pub fn readiness(state: &State) -> (bool, String) {
    let m = &state.metrics;
    let mut missing: Vec<String> = Vec::new();
    let install_error = lock(&state.install_error).clone();
    if !m.installed.get() {
        missing.push(match &install_error {
            Some(e) => format!("podwire-cni is not chained into the primary CNI config: {e}"),
            None => {
                "podwire-cni is not chained into the primary CNI config (waiting for one?)".into()
            }
        });
    }
    if !m.synced.get() {
        missing.push("the node's pod cache has not synced".into());
    }
    if !m.api_reachable.get() {
        missing.push("the API server is not reachable".into());
    }
    let note = if m.reverted_storms.get() > 0 {
        " (warning: another component keeps removing podwire's entry from the CNI config; see the agent's log)"
    } else {
        ""
    };
    if missing.is_empty() {
        (
            true,
            format!("podwire-cni is installed and the pod cache is synced{note}"),
        )
    } else {
        (false, format!("{}{note}", missing.join("; ")))
    }
}
