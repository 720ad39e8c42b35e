//! Reading the cluster for `podwire doctor`: every object the checks look at, read once with
//! the real kube client. A read that fails (404, 403, API server down) is kept as its error so
//! the checks that need it say "could not check" instead of the whole run failing.

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, Endpoints, Namespace, Node, Pod, ResourceQuota, Secret,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, ListParams};
use kube::Client;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::path::Path;
use std::time::Duration;

/// An object as read, or why it could not be read (already phrased for a person).
pub type Fetched<T> = Result<T, String>;

/// Where podwire's own objects live (install/podwire.yaml).
pub const SYSTEM_NS: &str = podwire_core::node::PODWIRE_NAMESPACE;
pub const WEBHOOK_CONFIG: &str = "podwire-sidecar-injector";
pub const INJECTOR: &str = "podwire-injector";
pub const INJECTOR_SECRET: &str = "podwire-injector-tls";
pub const AGENT: &str = podwire_core::node::AGENT_DAEMONSET;

/// Per request: a hung API server must not hang the doctor.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The client, or why there is none (no kubeconfig, unreadable file).
pub async fn client(kubeconfig: Option<&Path>) -> Fetched<Client> {
    let mut config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("reading kubeconfig {}: {}", path.display(), chain(&e)))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {}", path.display(), chain(&e)))?
        }
        None => kube::Config::infer().await.map_err(|e| {
            format!(
                "no cluster configuration (in-cluster, KUBECONFIG or ~/.kube/config): {}",
                chain(&e)
            )
        })?,
    };
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(REQUEST_TIMEOUT);
    Client::try_from(config).map_err(|e| format!("creating the Kubernetes client: {}", chain(&e)))
}

/// An error with its causes, which is where kube keeps "connection refused".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        cur = s.source();
    }
    out
}

fn describe(what: &str, e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{what}: {} {} ({})", s.code, s.reason, s.message),
        other => format!("{what}: {}", chain(other)),
    }
}

async fn get<K>(api: Api<K>, name: &str, what: String) -> Fetched<K>
where
    K: Clone + DeserializeOwned + Debug,
{
    match tokio::time::timeout(REQUEST_TIMEOUT, api.get(name)).await {
        Ok(r) => r.map_err(|e| describe(&format!("GET {what}"), &e)),
        Err(_) => Err(format!("GET {what}: no answer within {REQUEST_TIMEOUT:?}")),
    }
}

async fn list<K>(api: Api<K>, lp: ListParams, what: String) -> Fetched<Vec<K>>
where
    K: Clone + DeserializeOwned + Debug,
{
    match tokio::time::timeout(REQUEST_TIMEOUT, api.list(&lp)).await {
        Ok(r) => r
            .map(|l| l.items)
            .map_err(|e| describe(&format!("LIST {what}"), &e)),
        Err(_) => Err(format!("LIST {what}: no answer within {REQUEST_TIMEOUT:?}")),
    }
}

/// The RBAC objects, read cluster-wide.
#[derive(Debug, Clone, Default)]
pub struct Rbac {
    pub cluster_roles: Vec<ClusterRole>,
    pub cluster_role_bindings: Vec<ClusterRoleBinding>,
    pub roles: Vec<Role>,
    pub role_bindings: Vec<RoleBinding>,
}

/// Everything the checks read from the cluster.
#[derive(Debug)]
pub struct Cluster {
    pub namespace: Fetched<Namespace>,
    pub webhook: Fetched<MutatingWebhookConfiguration>,
    pub config_map: Fetched<ConfigMap>,
    pub secret: Fetched<Secret>,
    pub endpoints: Fetched<Endpoints>,
    pub endpoint_slices: Fetched<Vec<EndpointSlice>>,
    /// kube-system pods labelled component=kube-apiserver.
    pub apiservers: Fetched<Vec<Pod>>,
    /// The pod's node, or every node when the pod has none.
    pub nodes: Fetched<Vec<Node>>,
    pub quotas: Fetched<Vec<ResourceQuota>>,
    pub rbac: Fetched<Rbac>,
    /// The agent's DaemonSet (its `--repair` mode decides which pod verb it needs).
    pub agent: Fetched<DaemonSet>,
}

impl Cluster {
    /// Nothing could be read: every input carries `why`.
    pub fn unreachable(why: &str) -> Cluster {
        let e = why.to_string();
        Cluster {
            namespace: Err(e.clone()),
            webhook: Err(e.clone()),
            config_map: Err(e.clone()),
            secret: Err(e.clone()),
            endpoints: Err(e.clone()),
            endpoint_slices: Err(e.clone()),
            apiservers: Err(e.clone()),
            nodes: Err(e.clone()),
            quotas: Err(e.clone()),
            rbac: Err(e.clone()),
            agent: Err(e),
        }
    }

    /// Read everything at once (the reads do not depend on each other).
    pub async fn read(client: &Client, namespace: &str, node: Option<&str>) -> Cluster {
        let c = || client.clone();
        let ns_api: Api<Namespace> = Api::all(c());
        let service_selector =
            ListParams::default().labels(&format!("kubernetes.io/service-name={INJECTOR}"));
        let apiserver_selector = ListParams::default().labels("component=kube-apiserver");
        let nodes = async {
            let api: Api<Node> = Api::all(c());
            match node {
                Some(n) => get(api, n, format!("node {n}")).await.map(|n| vec![n]),
                None => list(api, ListParams::default(), "nodes".into()).await,
            }
        };
        let rbac = async {
            let (cr, crb, r, rb) = futures::join!(
                list(
                    Api::<ClusterRole>::all(c()),
                    ListParams::default(),
                    "clusterroles".into()
                ),
                list(
                    Api::<ClusterRoleBinding>::all(c()),
                    ListParams::default(),
                    "clusterrolebindings".into()
                ),
                list(
                    Api::<Role>::all(c()),
                    ListParams::default(),
                    "roles (all namespaces)".into()
                ),
                list(
                    Api::<RoleBinding>::all(c()),
                    ListParams::default(),
                    "rolebindings (all namespaces)".into()
                ),
            );
            Ok(Rbac {
                cluster_roles: cr?,
                cluster_role_bindings: crb?,
                roles: r?,
                role_bindings: rb?,
            })
        };
        let (ns_obj, webhook, config_map, secret, endpoints, slices) = futures::join!(
            get(ns_api, namespace, format!("namespace {namespace}")),
            get(
                Api::<MutatingWebhookConfiguration>::all(c()),
                WEBHOOK_CONFIG,
                format!("mutatingwebhookconfiguration {WEBHOOK_CONFIG}")
            ),
            get(
                Api::<ConfigMap>::namespaced(c(), SYSTEM_NS),
                INJECTOR,
                format!("configmap {SYSTEM_NS}/{INJECTOR}")
            ),
            get(
                Api::<Secret>::namespaced(c(), SYSTEM_NS),
                INJECTOR_SECRET,
                format!("secret {SYSTEM_NS}/{INJECTOR_SECRET}")
            ),
            get(
                Api::<Endpoints>::namespaced(c(), SYSTEM_NS),
                INJECTOR,
                format!("endpoints {SYSTEM_NS}/{INJECTOR}")
            ),
            list(
                Api::<EndpointSlice>::namespaced(c(), SYSTEM_NS),
                service_selector,
                format!("endpointslices {SYSTEM_NS} of service {INJECTOR}")
            ),
        );
        let (apiservers, nodes, quotas, rbac, agent) = futures::join!(
            list(
                Api::<Pod>::namespaced(c(), "kube-system"),
                apiserver_selector,
                "kube-system pods labelled component=kube-apiserver".into()
            ),
            nodes,
            list(
                Api::<ResourceQuota>::namespaced(c(), namespace),
                ListParams::default(),
                format!("resourcequotas in {namespace}")
            ),
            rbac,
            get(
                Api::<DaemonSet>::namespaced(c(), SYSTEM_NS),
                AGENT,
                format!("daemonset {SYSTEM_NS}/{AGENT}")
            ),
        );
        // Selectors are applied again here: an API server (or proxy) that ignores them must
        // not make another Service's slices or another pod count.
        let endpoint_slices = slices.map(|v| {
            v.into_iter()
                .filter(|s| {
                    label(&s.metadata.labels, "kubernetes.io/service-name") == Some(INJECTOR)
                })
                .collect()
        });
        let apiservers = apiservers.map(|v| {
            v.into_iter()
                .filter(|p| label(&p.metadata.labels, "component") == Some("kube-apiserver"))
                .collect()
        });
        Cluster {
            namespace: ns_obj,
            webhook,
            config_map,
            secret,
            endpoints,
            endpoint_slices,
            apiservers,
            nodes,
            quotas,
            rbac,
            agent,
        }
    }
}

pub fn label<'a>(
    labels: &'a Option<std::collections::BTreeMap<String, String>>,
    key: &str,
) -> Option<&'a str> {
    labels.as_ref()?.get(key).map(String::as_str)
}

/// The pod to check, read from the cluster.
pub async fn pod(client: &Client, namespace: &str, name: &str) -> Fetched<serde_json::Value> {
    let pod = get(
        Api::<Pod>::namespaced(client.clone(), namespace),
        name,
        format!("pod {namespace}/{name}"),
    )
    .await?;
    serde_json::to_value(&pod).map_err(|e| format!("pod {namespace}/{name}: {e}"))
}
