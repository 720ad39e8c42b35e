//! Namespace labels from a watch, so `/inject` checks the namespaceSelector itself and
//! gives the same answer as `review --namespace-labels` (the API server applies the
//! webhook's namespaceSelector before calling; this catches a misconfigured selector).

use crate::metrics::Metrics;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use podwire_core::inject::Labels;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

#[derive(Debug, Default)]
pub struct NamespaceLabels {
    labels: RwLock<HashMap<String, Arc<Labels>>>,
    /// The first complete list has been read.
    pub synced: AtomicBool,
}

impl NamespaceLabels {
    /// The namespace's labels, when the watch knows the namespace.
    pub fn get(&self, namespace: &str) -> Option<Arc<Labels>> {
        self.labels
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(namespace)
            .cloned()
    }

    pub fn set(&self, namespace: &str, labels: Labels) -> usize {
        let mut m = self.labels.write().unwrap_or_else(|p| p.into_inner());
        m.insert(namespace.to_string(), Arc::new(labels));
        m.len()
    }

    fn remove(&self, namespace: &str) -> usize {
        let mut m = self.labels.write().unwrap_or_else(|p| p.into_inner());
        m.remove(namespace);
        m.len()
    }

    fn replace(&self, all: HashMap<String, Arc<Labels>>) -> usize {
        let mut m = self.labels.write().unwrap_or_else(|p| p.into_inner());
        *m = all;
        m.len()
    }
}

fn name_and_labels(ns: Namespace) -> Option<(String, Labels)> {
    let name = ns.metadata.name?;
    Some((
        name,
        ns.metadata.labels.unwrap_or_default().into_iter().collect(),
    ))
}

/// Keep `store` in step with the cluster's namespaces until the task is dropped. The watcher
/// re-lists by itself after `410 Gone` or a broken connection (with back-off).
pub async fn watch(client: Client, store: Arc<NamespaceLabels>, metrics: Arc<Metrics>) {
    let api: Api<Namespace> = Api::all(client);
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut init: HashMap<String, Arc<Labels>> = HashMap::new();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(Event::Init) => init.clear(),
            Ok(Event::InitApply(ns)) => {
                if let Some((n, l)) = name_and_labels(ns) {
                    init.insert(n, Arc::new(l));
                }
            }
            Ok(Event::InitDone) => {
                let n = store.replace(std::mem::take(&mut init));
                metrics.set_namespaces(n);
                if !store.synced.swap(true, Ordering::SeqCst) {
                    tracing::info!(namespaces = n, "namespace watch synced");
                }
            }
            Ok(Event::Apply(ns)) => {
                if let Some((n, l)) = name_and_labels(ns) {
                    metrics.set_namespaces(store.set(&n, l));
                }
            }
            Ok(Event::Delete(ns)) => {
                if let Some(n) = ns.metadata.name {
                    metrics.set_namespaces(store.remove(&n));
                }
            }
            Err(e) => tracing::warn!(
                "namespace watch failed (namespace labels may be stale; retrying): {e}"
            ),
        }
    }
}
