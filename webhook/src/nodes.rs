//! Istio's `ENABLE_NATIVE_SIDECARS=auto` resolved as istiod resolves it, from a watch of the
//! cluster's nodes: native sidecars for a pod not yet bound to a node only while every node's
//! kubelet is 1.33 or newer (where they are GA); a pod already bound to a node follows that
//! node's kubelet. A node joining with an older kubelet switches new pods to the classic
//! layout at once.

use crate::istio_settings::LiveConfig;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use podwire_core::inject::istio::NodeSidecars;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Where the node watch is, for readiness.
#[derive(Debug, Default)]
pub struct NodeWatch {
    /// The first complete list has been read.
    pub synced: AtomicBool,
    /// The last failure, while it has not recovered.
    error: Mutex<Option<String>>,
}

impl NodeWatch {
    /// Why the watch is not synced yet, if it is not.
    pub fn not_synced(&self) -> Option<String> {
        if self.synced.load(Ordering::SeqCst) {
            return None;
        }
        let error = self.error.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Some(match error {
            None => "the node watch has not completed its first list yet".into(),
            Some(e) => format!(
                "the node watch has not completed its first list yet: {e} (the injector needs \
                 list and watch on nodes for ENABLE_NATIVE_SIDECARS=auto; or run with \
                 --no-node-watch)"
            ),
        })
    }

    fn failed(&self, e: Option<String>) {
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }
}

fn name_and_version(n: Node) -> Option<(String, String)> {
    let version = n
        .status
        .and_then(|s| s.node_info)
        .map(|i| i.kubelet_version)
        .unwrap_or_default();
    Some((n.metadata.name?, version))
}

/// Apply what `nodes` say to `live`, saying so when it changes the layout of pods not yet
/// bound to a node (nearly all: the scheduler places a pod after admission).
fn apply(nodes: &HashMap<String, String>, live: &LiveConfig, last: &mut Option<bool>) {
    let now = NodeSidecars::new(nodes.iter().map(|(n, v)| (n.as_str(), v.as_str())));
    let verdict = now.for_any_node().clone();
    if let Err(e) = live.set_nodes(now) {
        tracing::warn!("applying the nodes' sidecar layout failed: {e}");
        return;
    }
    let native = verdict.is_ok();
    if *last == Some(native) {
        return;
    }
    *last = Some(native);
    match verdict {
        Ok(n) => tracing::info!(
            nodes = n,
            "ENABLE_NATIVE_SIDECARS=auto: native sidecars (every kubelet is 1.33 or newer)"
        ),
        Err(why) => tracing::info!(
            "ENABLE_NATIVE_SIDECARS=auto: classic sidecars in containers, because {why} \
             (a pod already bound to a node follows that node's kubelet)"
        ),
    }
}

/// Keep `live`'s `auto` layout in step with the cluster's nodes until the task is dropped;
/// `state.synced` is set after the first complete list. The watcher re-lists by itself after
/// `410 Gone` or a broken connection (with back-off).
pub async fn watch(client: Client, live: Arc<LiveConfig>, state: Arc<NodeWatch>) {
    let api: Api<Node> = Api::all(client);
    // Small pages: a Node is large (images, conditions) and only its kubelet version is kept;
    // listing 500 at once would hold megabytes outside the request memory budget.
    let config = watcher::Config::default().page_size(50);
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    let (mut nodes, mut init) = (HashMap::new(), HashMap::new());
    let mut last = None;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(Event::Init) => init.clear(),
            Ok(Event::InitApply(n)) => {
                if let Some((name, v)) = name_and_version(n) {
                    init.insert(name, v);
                }
            }
            Ok(Event::InitDone) => {
                nodes = std::mem::take(&mut init);
                apply(&nodes, &live, &mut last);
                state.failed(None);
                if !state.synced.swap(true, Ordering::SeqCst) {
                    tracing::info!(nodes = nodes.len(), "node watch synced");
                }
            }
            Ok(Event::Apply(n)) => {
                // A node's status is rewritten every few minutes; only a new node or another
                // kubelet version can change a layout.
                if let Some((name, v)) = name_and_version(n) {
                    if nodes.get(&name) != Some(&v) {
                        nodes.insert(name, v);
                        apply(&nodes, &live, &mut last);
                    }
                }
            }
            Ok(Event::Delete(n)) => {
                if let Some(name) = n.metadata.name {
                    nodes.remove(&name);
                    apply(&nodes, &live, &mut last);
                }
            }
            Err(e) => {
                tracing::warn!(
                    "node watch failed (the sidecar layout for ENABLE_NATIVE_SIDECARS=auto may \
                     be stale; retrying; needs list and watch on nodes): {e}"
                );
                state.failed(Some(e.to_string()));
            }
        }
    }
}
