//! Repair: mesh pods running on this node with no plugin record started before podwire-cni
//! could redirect them (they raced the agent's install). Each is deleted, labelled or only
//! reported (`--repair`), once, with an Event on the pod.

use super::{api_call, lock, HeartbeatArgs, State};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::Client;
use podwire_core::mesh::{mesh_decision, DEFAULT_EXCLUDED_NAMESPACES};
use podwire_core::node::{records_dir, Record, Repair, UNINITIALIZED_LABEL};
use podwire_core::MeshProfile;
use serde_json::json;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use tracing::warn;

/// Pod UIDs the plugin left a record for (the records are the node contract's).
fn recorded_uids(state_dir: &Path) -> BTreeSet<String> {
    let Ok(entries) = std::fs::read_dir(records_dir(state_dir)) else {
        return BTreeSet::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|d| serde_json::from_slice::<Record>(&d).ok())
        .map(|r| r.uid)
        .collect()
}

fn running(pod: &Pod) -> bool {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

/// One repair pass over the cache.
pub async fn pass(client: &Client, node: &str, args: &HeartbeatArgs, state: &State) {
    let profile = MeshProfile::istio();
    let excluded: Vec<String> = DEFAULT_EXCLUDED_NAMESPACES
        .iter()
        .map(|s| s.to_string())
        .chain([args.namespace.clone()])
        .collect();
    let records = recorded_uids(&args.state_dir);
    let pods: Vec<Arc<Pod>> = state.pods();
    {
        // Forget pods that are gone: the set stays as large as the node's pods.
        let present: BTreeSet<&str> = pods
            .iter()
            .filter_map(|p| p.metadata.uid.as_deref())
            .collect();
        lock(&state.handled).retain(|uid| present.contains(uid.as_str()));
    }
    let raced: Vec<Arc<Pod>> = pods
        .into_iter()
        .filter(|p| running(p))
        .filter(|p| {
            p.metadata.uid.as_deref().is_some_and(|uid| {
                !uid.is_empty() && !records.contains(uid) && !lock(&state.handled).contains(uid)
            })
        })
        .filter(|p| {
            super::pod_cache::slim(p)
                .is_some_and(|info| mesh_decision(&info, &profile, &excluded).is_redirect())
        })
        .collect();
    for pod in raced {
        let ns = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = pod.metadata.name.clone().unwrap_or_default();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let result = match args.repair {
            Repair::Off => Ok(()),
            Repair::Delete => {
                let dp = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: Some(uid.clone()),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                api_call(&format!("DELETE pod {ns}/{name}"), api.delete(&name, &dp))
                    .await
                    .map(|_| ())
            }
            Repair::Label => {
                let patch = json!({"metadata": {"labels": {UNINITIALIZED_LABEL: "true"}}});
                api_call(
                    &format!("PATCH pod {ns}/{name} label {UNINITIALIZED_LABEL}"),
                    api.patch(&name, &PatchParams::default(), &Patch::Merge(patch)),
                )
                .await
                .map(|_| ())
            }
        };
        let message = match &result {
            Ok(()) => format!(
                "pod started before podwire-cni could redirect its traffic on node {node} (no plugin record for UID {uid}): {}",
                match args.repair {
                    Repair::Delete => "deleted it so its controller recreates it redirected",
                    Repair::Label => "labelled it podwire.io/uninitialized=true; restart it to get redirection",
                    Repair::Off => "restart it to get redirection (--repair=off)",
                }
            ),
            Err(e) => format!(
                "pod runs without redirection on node {node}; --repair={} failed: {e}",
                args.repair
            ),
        };
        warn!(pod = %format!("{ns}/{name}"), "{message}");
        lock(&state.handled).insert(uid.clone());
        state
            .events
            .on_pod(&pod, "Repair", "PodwireUninitialized", &message)
            .await;
        // Counted once the repair is complete, Event included: whoever reads the metric sees
        // a finished repair.
        state.metrics.repaired(args.repair, result.is_ok());
    }
}
