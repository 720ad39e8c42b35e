//! The checks, one per cause in the troubleshooting documents (Istio's "Sidecar Injection
//! Problems" and the service-mesh injection guide), in their order, one file per section of
//! the documents. Each is a pure function of what was read, so the report never depends on
//! the order things were fetched in.

mod admission;
mod apiserver_proxy;
mod node_agent;
mod permissions;
mod pods_not_created;
mod unexpected_result;

use admission::{pod_security, resource_quota};
use apiserver_proxy::apiserver_proxy;
use node_agent::node_agent;
use permissions::rbac_check;
use pods_not_created::{ca_bundle, cert_expiry, failure_policy, injector_endpoints};
use unexpected_result::{
    default_policy, host_network, namespace_selector, pod_annotation, system_namespace,
};

use super::certs::{self, Trust};
use super::fetch::{self, Cluster, Fetched, INJECTOR, INJECTOR_SECRET, SYSTEM_NS, WEBHOOK_CONFIG};
use super::pss::{self, Level};
use super::rbac;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhook;
use podwire_core::inject::config::SYSTEM_NAMESPACES;
use podwire_core::inject::selector::{Operator, Requirement};
use podwire_core::inject::{
    apply_patch, decide, injection_patch, plan, read_pod, InjectorConfig, LabelSelector, Labels,
    Policy, Quantity, Step,
};
use podwire_core::node::{Repair, CONDITION};
use podwire_core::MeshProfile;
use podwire_injector::LoadedConfig;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    Unknown,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub id: &'static str,
    pub title: &'static str,
    pub status: Status,
    /// What was looked at and found, one fact per line.
    pub evidence: String,
    /// What to do (failures), or how to check by hand (could not check).
    pub fix: Option<String>,
}

/// The pod (template) under examination.
#[derive(Debug, Clone)]
pub struct Subject {
    /// `Pod shop/web` or `Deployment shop/web (from web.yaml)`.
    pub source: String,
    pub kind: String,
    pub name: String,
    /// The pod, or the workload's pod template, with its namespace filled in.
    pub pod: Value,
    /// A workload's own metadata (not its pods').
    pub workload_meta: Option<Value>,
    pub node: Option<String>,
}

pub struct Inputs<'a> {
    pub namespace: &'a str,
    /// `Ok(None)`: no pod was given.
    pub subject: &'a Fetched<Option<Subject>>,
    pub cluster: &'a Cluster,
    pub profile: &'a MeshProfile,
    pub now: i64,
}

/// The injector config from its ConfigMap: `Err((invalid, why))`, where `invalid` says the
/// ConfigMap was read but the injector would refuse its config.
type Config = Result<LoadedConfig, (bool, String)>;

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: Status,
    /// What was looked at and found, one fact per entry.
    pub evidence: Vec<String>,
    /// What to do (failures).
    pub fix: Option<String>,
}

fn pass(evidence: Vec<String>) -> Outcome {
    Outcome {
        status: Status::Pass,
        evidence,
        fix: None,
    }
}

fn fail(evidence: Vec<String>, fix: impl Into<String>) -> Outcome {
    Outcome {
        status: Status::Fail,
        evidence,
        fix: Some(fix.into()),
    }
}

fn unknown(why: impl Into<String>) -> Outcome {
    Outcome {
        status: Status::Unknown,
        evidence: vec![format!("could not check: {}", why.into())],
        fix: None,
    }
}

const NO_POD: &str = "no pod given (use --pod NAME or -f FILE)";
const RESTART_INJECTOR: &str =
    "kubectl -n podwire-system rollout restart deployment podwire-injector";

/// Every check, in the documents' order.
pub fn run(inp: &Inputs) -> Vec<Check> {
    let cfg = config(inp.cluster, inp.profile);
    let table: [(&'static str, &'static str, Outcome); 14] = [
        (
            "system-namespace",
            "namespace is not kube-system/kube-public or one the injector ignores",
            system_namespace(inp, &cfg),
        ),
        (
            "host-network",
            "pod does not use hostNetwork",
            host_network(inp),
        ),
        (
            "namespace-selector",
            "namespace labels match the webhook's namespaceSelector",
            namespace_selector(inp),
        ),
        (
            "default-policy",
            "default injection policy in the injector ConfigMap",
            default_policy(inp, &cfg),
        ),
        (
            "pod-annotation",
            "per-pod sidecar.istio.io/inject on the pod template",
            pod_annotation(inp),
        ),
        (
            "ca-bundle",
            "webhook caBundle trusts the injector's serving certificate",
            ca_bundle(inp),
        ),
        (
            "injector-endpoints",
            "injector Service has ready endpoints",
            injector_endpoints(inp),
        ),
        (
            "cert-expiry",
            "injector serving certificate is valid for at least 7 days",
            cert_expiry(inp),
        ),
        (
            "webhook-failure-policy",
            "webhook failurePolicy and timeoutSeconds",
            failure_policy(inp),
        ),
        (
            "apiserver-proxy",
            "kube-apiserver *_proxy settings do not proxy the webhook",
            apiserver_proxy(inp),
        ),
        (
            "node-agent",
            "podwire-agent ready and podwire-cni chained on the node",
            node_agent(inp),
        ),
        (
            "resource-quota",
            "ResourceQuota leaves room for the proxy",
            resource_quota(inp, &cfg),
        ),
        (
            "pod-security",
            "injected pod meets the namespace's Pod Security level",
            pod_security(inp, &cfg),
        ),
        (
            "rbac",
            "RBAC grants podwire-agent and podwire-injector what they call",
            rbac_check(inp),
        ),
    ];
    table
        .into_iter()
        .map(|(id, title, o)| Check {
            id,
            title,
            status: o.status,
            evidence: o.evidence.join("\n"),
            fix: o.fix,
        })
        .collect()
}

fn config(cluster: &Cluster, profile: &MeshProfile) -> Config {
    let cm = cluster
        .config_map
        .as_ref()
        .map_err(|e| (false, e.clone()))?;
    let data = cm.data.as_ref();
    // podwire's install keeps it under config.yaml; Istio's ConfigMap under config.
    let (key, text) = ["config.yaml", "config"]
        .into_iter()
        .find_map(|k| data.and_then(|d| d.get(k)).map(|t| (k, t)))
        .ok_or_else(|| {
            (
                true,
                format!(
                    "configmap {SYSTEM_NS}/{INJECTOR} has no data[config.yaml] (or data[config])"
                ),
            )
        })?;
    let origin = format!("configmap {SYSTEM_NS}/{INJECTOR} data[{key}]");
    podwire_injector::parse_config(text, &origin, profile).map_err(|e| (true, e.to_string()))
}

fn cfg_unusable(cfg: &Config) -> Option<String> {
    cfg.as_ref()
        .err()
        .map(|(_, why)| format!("the injector config is not usable: {why}"))
}

fn subject<'a>(inp: &'a Inputs) -> Result<&'a Subject, String> {
    match inp.subject {
        Ok(Some(s)) => Ok(s),
        Ok(None) => Err(NO_POD.into()),
        Err(e) => Err(e.clone()),
    }
}

fn webhooks<'a>(inp: &Inputs<'a>) -> Result<&'a Vec<MutatingWebhook>, String> {
    let wc = inp.cluster.webhook.as_ref().map_err(Clone::clone)?;
    match &wc.webhooks {
        Some(w) if !w.is_empty() => Ok(w),
        _ => Err(format!(
            "mutatingwebhookconfiguration {WEBHOOK_CONFIG} has no webhooks"
        )),
    }
}

/// The name the API server checks the certificate for.
fn webhook_host(w: &MutatingWebhook) -> String {
    if let Some(s) = &w.client_config.service {
        return format!("{}.{}.svc", s.name, s.namespace);
    }
    let url = w.client_config.url.as_deref().unwrap_or("");
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or("").to_string(),
        None => host.split(':').next().unwrap_or("").to_string(),
    }
}
