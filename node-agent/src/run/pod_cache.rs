//! The node's pod cache: a kube-rs reflector over the node-scoped watch
//! (`spec.nodeName=<node>`), each pod stripped to what the plugin and repair read before it is
//! stored. Ready only after the first complete list.

use crate::lookup_server::{Held, PodIndex};
use crate::metrics::Metrics;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, PodStatus, SecurityContext};
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use podwire_core::lookup::{self, LookupRequest, PodMatch};
use podwire_core::pod::READ_ENV;
use podwire_core::PodInfo;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tracing::{info, warn};

/// The slice of the pod the plugin needs, as core's type.
pub fn slim(pod: &Pod) -> Option<PodInfo> {
    serde_json::to_value(pod)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok())
}

/// Drop everything neither the plugin nor repair reads, before the reflector stores the pod:
/// a node's cache then costs a few KiB per pod, not the whole object.
pub fn strip(pod: &mut Pod) {
    let m = &mut pod.metadata;
    m.managed_fields = None;
    m.owner_references = None;
    if let Some(a) = m.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    let container = |c: &mut Container| Container {
        name: std::mem::take(&mut c.name),
        restart_policy: c.restart_policy.take(),
        // As core's PodInfo reads them: the proxy's type, and only the env a decision reads.
        args: c.args.take().map(|mut a| {
            a.truncate(2);
            a
        }),
        env: c
            .env
            .take()
            .map(|e| {
                e.into_iter()
                    .filter(|v| READ_ENV.contains(&v.name.as_str()))
                    .collect::<Vec<_>>()
            })
            .filter(|e| !e.is_empty()),
        security_context: c.security_context.take().map(|s| SecurityContext {
            run_as_user: s.run_as_user,
            run_as_group: s.run_as_group,
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    pod.spec = pod.spec.take().map(|mut s| PodSpec {
        containers: s.containers.iter_mut().map(container).collect(),
        init_containers: s
            .init_containers
            .as_mut()
            .map(|cs| cs.iter_mut().map(container).collect()),
        host_network: s.host_network,
        node_name: s.node_name,
        ..PodSpec::default()
    });
    pod.status = pod.status.take().map(|s| PodStatus {
        phase: s.phase,
        ..PodStatus::default()
    });
}

/// The reflector's store, as the look-up server's index.
pub struct Cache(pub Store<Pod>);

impl PodIndex for Cache {
    fn held(&self, request: &LookupRequest) -> Held {
        let key = ObjectRef::new(&request.name).within(&request.namespace);
        let Some(pod) = self.0.get(&key) else {
            return Held::Absent;
        };
        match slim(&pod) {
            None => Held::Unreadable("the watched pod cannot be read as a pod".into()),
            Some(info) => match lookup::pod_match(&info, request) {
                PodMatch::Same => Held::Found(Box::new(info)),
                PodMatch::OtherUid { held } => Held::OtherUid(held),
                PodMatch::Different => Held::Absent,
            },
        }
    }
}

/// Start the reflector; `synced` turns true (and the metric with it) after the first list.
pub fn start(
    client: Client,
    node: String,
    synced: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) -> Store<Pod> {
    let (store, writer) = reflector::store::<Pod>();
    let api: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let stream = watcher::watcher(api, config)
        .default_backoff()
        .modify(strip)
        .reflect(writer);
    {
        let (node, metrics, held) = (node.clone(), metrics.clone(), store.clone());
        tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(item) = stream.next().await {
                // Every event (deletes too) moves the gauge. The watcher re-lists (410 Gone) or
                // re-watches after a back-off by itself; the cache keeps serving meanwhile.
                if let Err(e) = item {
                    warn!("pod watch on node {node}: {e}; retrying");
                }
                metrics.cached_pods.set(held.state().len() as i64);
            }
        });
    }
    let ready = store.clone();
    tokio::spawn(async move {
        if ready.wait_until_ready().await.is_ok() {
            synced.store(true, Ordering::SeqCst);
            metrics.synced.set(true);
            metrics.cached_pods.set(ready.state().len() as i64);
            info!(
                "pod cache synced: {} pods on node {node}",
                ready.state().len()
            );
        }
    });
    store
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripping_keeps_what_the_plugin_reads() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "u1",
                "labels": {"app": "web"},
                "annotations": {"sidecar.istio.io/status": "{}",
                    "kubectl.kubernetes.io/last-applied-configuration": "{...big...}"},
                "managedFields": [{"manager": "kubectl"}]},
            "spec": {"nodeName": "n1", "hostNetwork": false,
                "volumes": [{"name": "v", "emptyDir": {}}],
                "initContainers": [{"name": "istio-proxy", "image": "proxyv2", "restartPolicy": "Always",
                    "args": ["proxy", "router", "--domain", "x"],
                    "env": [{"name": "A", "value": "b"}, {"name": "DISABLE_ENVOY", "value": "true"}],
                    "securityContext": {"runAsUser": 1337, "runAsGroup": 1337, "privileged": false}}],
                "containers": [{"name": "app", "image": "nginx", "args": ["x"]}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .expect("pod");
        let mut before = slim(&pod).expect("readable");
        before
            .metadata
            .annotations
            .remove("kubectl.kubernetes.io/last-applied-configuration");
        let mut stripped = pod.clone();
        strip(&mut stripped);
        assert_eq!(
            slim(&stripped).expect("readable"),
            before,
            "the plugin's view is unchanged"
        );
        let proxy = &stripped
            .spec
            .as_ref()
            .expect("spec")
            .init_containers
            .as_ref()
            .expect("init")[0];
        assert!(proxy.image.is_none());
        assert_eq!(
            proxy.args.as_deref(),
            Some(&["proxy".into(), "router".into()][..])
        );
        let env = proxy.env.as_deref().expect("the env a decision reads");
        assert_eq!((env.len(), env[0].name.as_str()), (1, "DISABLE_ENVOY"));
        assert_eq!(
            stripped.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Running")
        );
        assert!(stripped.metadata.managed_fields.is_none());
        assert!(!stripped
            .metadata
            .annotations
            .as_ref()
            .expect("kept")
            .contains_key("kubectl.kubernetes.io/last-applied-configuration"));
        let size = |p: &Pod| serde_json::to_vec(p).expect("json").len();
        assert!(size(&stripped) < size(&pod));
    }
}
