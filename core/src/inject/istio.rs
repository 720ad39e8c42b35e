//! Istio's sidecar injection template (the `sidecar` template of
//! `manifests/charts/istio-control/istio-discovery/files/injection-template.yaml`, Istio
//! 1.31.0-alpha.0-109-g86c9f01, pinned in README) as Rust, for the istio-cni case and minus
//! every init container: podwire-cni programs the redirection, so neither `istio-init` nor
//! `istio-validation` is added.
//!
//! Inputs are Istio's own: the `values` of the `istio-sidecar-injector` ConfigMap (Helm values
//! as installed) and the `mesh` of the `istio` ConfigMap (MeshConfig). [`IstioSettings::resolve`]
//! reads every key the template reads once, checked, into [`Resolved`]; [`render`] then builds
//! the injected pod for one pod object. Nothing a pod author writes is pasted into text that is
//! parsed again: annotation values are checked and placed as JSON strings.

use super::grpc_agent;
use super::json::{Json, Node, Raw};
use super::quantity::Quantity;
use crate::error::{Error, Result};
use serde_json::{json, Map, Value};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// The proxy container's name in Istio's template (and what the CNI plugin looks for).
pub const PROXY: &str = "istio-proxy";
/// `sidecar.istio.io/status`.
pub const STATUS: &str = "sidecar.istio.io/status";
/// Env telling pilot-agent to probe the app on localhost (mesh `inboundTrafficPolicy:
/// LOCALHOST`), sidecar template only.
const LEGACY_LOCALHOST: &str = "REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION";
/// `inject.istio.io/templates`: the injection templates a pod asks for (Istio's default:
/// `sidecar`).
pub const TEMPLATES: &str = "inject.istio.io/templates";
/// `proxy.istio.io/overrides`: the pod's own proxy container, kept for re-injection.
pub const OVERRIDES: &str = "proxy.istio.io/overrides";

/// Per-pod annotations of Istio's template (or injector) that podwire does not apply; each one
/// present on a pod is named in an AdmissionResponse warning, with why.
pub const REFUSED_ANNOTATIONS: [(&str, &str); 5] = [
    (
        "sidecar.istio.io/capNetBindService",
        "it runs the proxy as root; podwire keeps the proxy restricted",
    ),
    (
        "sidecar.istio.io/enableCoreDump",
        "it needs a privileged init container; podwire adds none",
    ),
    (
        "traffic.sidecar.istio.io/kubevirtInterfaces",
        "podwire-cni does not reroute virtual interfaces",
    ),
    (
        "istio.io/reroute-virtual-interfaces",
        "podwire-cni does not reroute virtual interfaces",
    ),
    (
        "apm.datadoghq.com/env",
        "the datadog tracer's per-pod env is not rendered",
    ),
];

/// Istio's installed configuration as podwire reads it: the `values` (Helm values of the
/// `istio-sidecar-injector` ConfigMap) and the `mesh` (MeshConfig of the `istio` ConfigMap).
#[derive(Debug, Clone, Copy)]
pub struct IstioSettings<'a> {
    pub values: &'a Value,
    pub mesh: &'a Value,
}

/// Native-sidecar layout selection, as Istio's `ENABLE_NATIVE_SIDECARS` (istiod env, read from
/// `values.pilot.env`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NativeMode {
    /// `true`.
    Enabled,
    /// `false`.
    Disabled,
    /// `auto` (Istio's default): decided by the nodes' kubelets ([`NodeSidecars`], the
    /// webhook's node watch); without node information (offline, `--no-node-watch`) native
    /// (Kubernetes ≥ 1.33, where native sidecars are GA).
    Auto,
}

/// Kubernetes minor version from which Istio's `auto` injects native sidecars (they are GA
/// there, KEP-753).
pub const NATIVE_SIDECAR_MIN_MINOR: u64 = 33;

/// The minor version istiod reads from a kubelet version (hashicorp/go-version: one optional
/// `v`, dot-separated numbers, then the end, a pre-release or build part; missing segments are
/// 0; the major is not looked at).
fn kubelet_minor(version: &str) -> Option<u64> {
    let v = version.strip_prefix('v').unwrap_or(version);
    let end = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (numbers, rest) = v.split_at(end);
    let tail_ok = rest.is_empty()
        || rest.starts_with(['-', '+'])
        || rest.starts_with(|c: char| c.is_ascii_alphabetic());
    let segments: Vec<&str> = numbers.split('.').collect();
    if !tail_ok || segments.iter().any(|s| s.parse::<u64>().is_err()) {
        return None;
    }
    segments.get(1).map_or(Some(0), |m| m.parse().ok())
}

/// Istio's `auto` rule: native sidecars only when there is a node and every node's kubelet
/// version (`status.nodeInfo.kubeletVersion`, e.g. `v1.33.2-eks-1`) is readable and at least
/// 1.33 (GA there), as istiod decides. On failure, the first node that decided it, with why.
pub fn kubelets_run_native_sidecars<'a>(
    nodes: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<usize, String> {
    let mut count = 0;
    for (node, version) in nodes {
        match kubelet_minor(version) {
            Some(m) if m >= NATIVE_SIDECAR_MIN_MINOR => count += 1,
            Some(_) => {
                return Err(format!(
                    "node {node} runs kubelet {version}, older than 1.{NATIVE_SIDECAR_MIN_MINOR}"
                ))
            }
            None => {
                return Err(format!(
                    "node {node} reports kubelet version {version:?}, which does not read as \
                     1.<minor>"
                ))
            }
        }
    }
    if count == 0 {
        return Err("the cluster has no node yet".into());
    }
    Ok(count)
}

/// Istio's `auto` as the cluster's nodes decide it, per pod: a pod already bound to a node
/// (`spec.nodeName`) gets what that node's kubelet runs; any other pod (the usual case, the
/// scheduler has not placed it yet) or one bound to a node not seen gets native sidecars only
/// when every node's does ([`kubelets_run_native_sidecars`]). As istiod's `DetectNativeSidecar`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSidecars {
    /// Per node: whether its kubelet runs native sidecars (1.33 or newer, readable).
    per_node: std::collections::HashMap<String, bool>,
    /// The verdict for every node: how many, or the first that decided against, with why.
    all: Result<usize, String>,
}

impl NodeSidecars {
    /// From the nodes' `(name, status.nodeInfo.kubeletVersion)`.
    pub fn new<'a>(nodes: impl IntoIterator<Item = (&'a str, &'a str)> + Clone) -> Self {
        NodeSidecars {
            per_node: nodes
                .clone()
                .into_iter()
                .map(|(n, v)| (n.to_string(), runs_native_sidecars(v)))
                .collect(),
            all: kubelets_run_native_sidecars(nodes),
        }
    }

    /// For a pod bound to `node` (its `spec.nodeName`, empty when not scheduled).
    pub fn native_on(&self, node: &str) -> bool {
        match self.per_node.get(node) {
            Some(native) if !node.is_empty() => *native,
            _ => self.all.is_ok(),
        }
    }

    /// The verdict for a pod not bound to a node: how many nodes, or why not.
    pub fn for_any_node(&self) -> &Result<usize, String> {
        &self.all
    }
}

/// Whether a kubelet of this version runs native sidecars as Istio's `auto` reads it.
fn runs_native_sidecars(version: &str) -> bool {
    kubelet_minor(version).is_some_and(|m| m >= NATIVE_SIDECAR_MIN_MINOR)
}

/// Every setting the template reads, checked once.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub hub: String,
    pub tag: String,
    pub variant: String,
    pub proxy_image: String,
    pub image_pull_policy: Option<String>,
    pub image_pull_secrets: Vec<String>,
    pub cluster_domain: String,
    pub log_level: String,
    pub component_log_level: String,
    pub agent_log_level: String,
    pub log_as_json: bool,
    pub sts_port: i64,
    pub outlier_log_path: String,
    pub lifecycle: Option<Value>,
    pub hold_values: bool,
    pub pilot_cert_provider: String,
    pub ca_address: String,
    pub cluster_name: String,
    pub network: String,
    pub mesh_id: String,
    pub trust_domain: String,
    pub status_port: String,
    pub startup_enabled: bool,
    pub startup_failure_threshold: i64,
    pub readiness_initial_delay: i64,
    pub readiness_period: i64,
    pub readiness_failure_threshold: i64,
    pub privileged: bool,
    pub seccomp_profile: Option<Value>,
    pub resources: Option<Value>,
    pub ca_name: String,
    pub sds_audience: String,
    pub trust_bundle_name: String,
    pub cluster_trust_bundle: bool,
    pub crl_config_map: String,
    pub mount_mtls_certs: bool,
    pub cni_enabled: bool,
    pub revision: String,
    pub native: NativeMode,
    /// What `auto` means per pod, once the webhook's node watch has said
    /// ([`super::InjectorConfig::prepared`]); `None`: native.
    pub nodes: Option<std::sync::Arc<NodeSidecars>>,
    pub rewrite_app_probe: bool,
    pub include_ip_ranges: String,
    pub exclude_ip_ranges: String,
    pub include_inbound_ports: String,
    pub exclude_inbound_ports: String,
    pub include_outbound_ports: String,
    pub exclude_outbound_ports: String,
    pub injected_annotations: BTreeMap<String, String>,
    /// MeshConfig `defaultConfig` (ProxyConfig), as written.
    pub default_config: Value,
    pub mesh_trust_domain: String,
    pub prometheus_merge: bool,
    pub inbound_localhost: bool,
    /// `values.gateways.securityContext`: the gateway template's pod securityContext
    /// (default: unprivileged ports from 0, so a gateway binds 80/443 without a capability).
    pub gateway_security_context: Option<Value>,
    /// `PROXY_CONFIG` for a pod without `proxy.istio.io/config`: `default_config` cleaned
    /// (computed once, from the fields above).
    pub default_proxy_config_env: String,
}

/// `v`'s member at `path`, key by key: `Value::pointer` without its per-token copies (a
/// render reads a few of these per pod).
pub(crate) fn member_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(v, |v, k| v.get(k))
        .filter(|v| !v.is_null())
}

fn bad(field: String, reason: &str) -> Error {
    Error::InvalidConfig {
        field,
        reason: reason.to_string(),
    }
}

/// Typed look-ups with the chart's defaults; a value of the wrong type is an error naming it.
struct Reader<'a> {
    root: &'a Value,
    prefix: &'static str,
}

impl Reader<'_> {
    fn field(&self, path: &str) -> String {
        format!("{}.{path}", self.prefix)
    }
    /// Strings as Helm prints them: numbers and booleans are accepted (`tag: 1.24`).
    fn s(&self, path: &str, default: &str) -> Result<String> {
        match at(self.root, path) {
            None => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            Some(Value::Bool(b)) => Ok(b.to_string()),
            Some(_) => Err(bad(self.field(path), "expected a string")),
        }
    }
    fn b(&self, path: &str, default: bool) -> Result<bool> {
        match at(self.root, path) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(Value::String(s)) if s == "true" || s == "false" => Ok(s == "true"),
            Some(_) => Err(bad(self.field(path), "expected true or false")),
        }
    }
    fn n(&self, path: &str, default: i64) -> Result<i64> {
        match at(self.root, path) {
            None => Ok(default),
            Some(Value::Number(n)) => n
                .as_i64()
                .ok_or_else(|| bad(self.field(path), "expected an integer")),
            Some(Value::String(s)) => s
                .trim()
                .parse()
                .map_err(|_| bad(self.field(path), "expected an integer")),
            Some(_) => Err(bad(self.field(path), "expected an integer")),
        }
    }
    fn obj(&self, path: &str) -> Result<Option<Value>> {
        match at(self.root, path) {
            None => Ok(None),
            Some(Value::Object(m)) if m.is_empty() => Ok(None),
            Some(v @ Value::Object(_)) => Ok(Some(v.clone())),
            Some(_) => Err(bad(self.field(path), "expected a mapping")),
        }
    }
}

/// `v` without null members at any depth (Helm's `omitNil`): a null reads as absent, as Go's
/// typed decode of the same JSON has it (an unset pointer or omitempty field).
fn omit_nil(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), omit_nil(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(omit_nil).collect()),
        other => other.clone(),
    }
}

impl IstioSettings<'_> {
    /// Read and check every setting the template uses; the first problem names its key.
    pub fn resolve(&self) -> Result<Resolved> {
        for (doc, name) in [(self.values, "values"), (self.mesh, "mesh")] {
            if !(doc.is_object() || doc.is_null()) {
                return Err(bad(name.into(), "expected a mapping"));
            }
        }
        let v = Reader {
            root: self.values,
            prefix: "values",
        };
        let m = Reader {
            root: self.mesh,
            prefix: "mesh",
        };
        let revision = v.s("revision", "")?;
        let namespace = v.s("global.istioNamespace", "istio-system")?;
        let ca_address = match v.s("global.caAddress", "")? {
            a if !a.is_empty() => a,
            _ if revision.is_empty() => format!("istiod.{namespace}.svc:15012"),
            _ => format!("istiod-{revision}.{namespace}.svc:15012"),
        };
        let native = match v.s("pilot.env.ENABLE_NATIVE_SIDECARS", "auto")?.as_str() {
            "true" => NativeMode::Enabled,
            "false" => NativeMode::Disabled,
            "auto" => NativeMode::Auto,
            _ => {
                return Err(bad(
                    "values.pilot.env.ENABLE_NATIVE_SIDECARS".into(),
                    "expected true, false or auto",
                ))
            }
        };
        let resources = match at(self.values, "global.proxy.resources") {
            // The chart's default (values.yaml of istio-discovery).
            None if self.values.pointer("/global/proxy/resources").is_none() => Some(json!({
                "requests": {"cpu": "100m", "memory": "128Mi"},
                "limits": {"cpu": "2000m", "memory": "1024Mi"},
            })),
            // Set to null on purpose (Istio's proxy-resources-null case): none.
            None => None,
            Some(r @ Value::Object(_)) => {
                let r = omit_nil(r);
                for kind in ["requests", "limits"] {
                    if let Some(Value::Object(map)) = r.get(kind) {
                        for (res, q) in map {
                            let text = match q {
                                Value::String(s) => s.clone(),
                                Value::Number(n) => n.to_string(),
                                _ => String::new(),
                            };
                            Quantity::parse(&text).map_err(|why| {
                                bad(
                                    format!("values.global.proxy.resources.{kind}.{res}"),
                                    &format!("{q}: {why}"),
                                )
                            })?;
                        }
                    }
                }
                Some(r)
            }
            Some(_) => {
                return Err(bad(
                    "values.global.proxy.resources".into(),
                    "expected a mapping",
                ))
            }
        };
        let mut injected_annotations = BTreeMap::new();
        if let Some(Value::Object(map)) = v.obj("sidecarInjectorWebhook.injectedAnnotations")? {
            for (k, val) in map {
                let Value::String(s) = val else {
                    return Err(bad(
                        format!("values.sidecarInjectorWebhook.injectedAnnotations.{k}"),
                        "expected a string",
                    ));
                };
                injected_annotations.insert(k, s);
            }
        }
        let image_pull_secrets = match at(self.values, "global.imagePullSecrets") {
            None => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|s| match s {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(bad(
                        "values.global.imagePullSecrets".into(),
                        "expected a list of names",
                    )),
                })
                .collect::<Result<_>>()?,
            Some(_) => {
                return Err(bad(
                    "values.global.imagePullSecrets".into(),
                    "expected a list of names",
                ))
            }
        };
        let default_config = match at(self.mesh, "defaultConfig") {
            None => json!({}),
            Some(c @ Value::Object(_)) => c.clone(),
            Some(_) => return Err(bad("mesh.defaultConfig".into(), "expected a mapping")),
        };
        if let Some(mode) = default_config.get("interceptionMode") {
            if !mode.as_str().is_some_and(interception_mode_known) {
                return Err(bad(
                    "mesh.defaultConfig.interceptionMode".into(),
                    "expected REDIRECT, TPROXY or NONE",
                ));
            }
        }
        let mesh_trust_domain = m.s("trustDomain", "cluster.local")?;
        let inbound_localhost = m.s("inboundTrafficPolicy.mode", "PASSTHROUGH")? == "LOCALHOST";
        let image_pull_policy = Some(v.s("global.imagePullPolicy", "")?).filter(|p| !p.is_empty());
        let r = Resolved {
            hub: v.s("global.hub", "docker.io/istio")?,
            tag: v.s("global.tag", "1.28.0")?,
            variant: v.s("global.variant", "")?,
            proxy_image: v.s("global.proxy.image", "proxyv2")?,
            image_pull_policy,
            image_pull_secrets,
            cluster_domain: v.s("global.proxy.clusterDomain", "cluster.local")?,
            log_level: v.s("global.proxy.logLevel", "warning")?,
            component_log_level: v.s("global.proxy.componentLogLevel", "misc:error")?,
            agent_log_level: v.s("global.logging.level", "default:info")?,
            log_as_json: v.b("global.logAsJson", false)?,
            sts_port: v.n("global.sts.servicePort", 0)?,
            outlier_log_path: v.s("global.proxy.outlierLogPath", "")?,
            lifecycle: v.obj("global.proxy.lifecycle")?,
            hold_values: v.b("global.proxy.holdApplicationUntilProxyStarts", false)?,
            pilot_cert_provider: v.s("global.pilotCertProvider", "istiod")?,
            ca_address,
            cluster_name: v.s("global.multiCluster.clusterName", "")?,
            network: v.s("global.network", "")?,
            mesh_id: v.s("global.meshID", "")?,
            trust_domain: v.s("global.trustDomain", "")?,
            status_port: v.n("global.proxy.statusPort", 15020)?.to_string(),
            startup_enabled: v.b("global.proxy.startupProbe.enabled", true)?,
            startup_failure_threshold: v.n("global.proxy.startupProbe.failureThreshold", 600)?,
            readiness_initial_delay: v.n("global.proxy.readinessInitialDelaySeconds", 0)?,
            readiness_period: v.n("global.proxy.readinessPeriodSeconds", 15)?,
            readiness_failure_threshold: v.n("global.proxy.readinessFailureThreshold", 4)?,
            privileged: v.b("global.proxy.privileged", false)?,
            seccomp_profile: v.obj("global.proxy.seccompProfile")?,
            resources,
            ca_name: v.s("global.caName", "")?,
            sds_audience: v.s("global.sds.token.aud", "istio-ca")?,
            trust_bundle_name: v.s("global.trustBundleName", "")?,
            cluster_trust_bundle: v.b("pilot.env.ENABLE_CLUSTER_TRUST_BUNDLE_API", false)?,
            crl_config_map: v.s("pilot.crlConfigMapName", "")?,
            mount_mtls_certs: v.b("global.mountMtlsCerts", false)?,
            cni_enabled: v.b("pilot.cni.enabled", false)?,
            revision,
            native,
            nodes: None,
            rewrite_app_probe: v.b("sidecarInjectorWebhook.rewriteAppHTTPProbe", true)?,
            include_ip_ranges: v.s("global.proxy.includeIPRanges", "*")?,
            exclude_ip_ranges: v.s("global.proxy.excludeIPRanges", "")?,
            include_inbound_ports: v.s("global.proxy.includeInboundPorts", "*")?,
            exclude_inbound_ports: v.s("global.proxy.excludeInboundPorts", "")?,
            include_outbound_ports: v.s("global.proxy.includeOutboundPorts", "")?,
            exclude_outbound_ports: v.s("global.proxy.excludeOutboundPorts", "")?,
            injected_annotations,
            default_proxy_config_env: format!("{}\n", clean_proxy_config(&default_config)),
            default_config,
            mesh_trust_domain,
            prometheus_merge: m.b("enablePrometheusMerge", true)?,
            inbound_localhost,
            gateway_security_context: v.obj("gateways.securityContext")?,
        };
        for (field, text) in [
            ("values.global.hub", &r.hub),
            ("values.global.tag", &r.tag),
            ("values.global.proxy.image", &r.proxy_image),
        ] {
            if text.is_empty() || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(bad(
                    field.into(),
                    "must be non-empty, without spaces (the proxy image is built from it)",
                ));
            }
        }
        Ok(r)
    }
}

/// The workload a pod belongs to, as Istio names it (`ISTIO_META_WORKLOAD_NAME`,
/// `ISTIO_META_OWNER`, the canonical-name fallback).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Workload {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    pub namespace: String,
}

impl Workload {
    /// From the pod itself, as Istio's webhook does: the controller owner reference when the
    /// name is generated (a ReplicaSet with `pod-template-hash` is its Deployment, a Job named
    /// `<cron>-<8..10 digits>` its CronJob), else the pod.
    pub fn from_pod(pod: &Value) -> Workload {
        let meta = pod.get("metadata");
        let text = |k: &str| {
            meta.and_then(|m| m.get(k))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let label = |k: &str| {
            meta.and_then(|m| m.get("labels"))
                .and_then(|l| l.get(k))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let mut w = Workload {
            api_version: "v1".into(),
            kind: "Pod".into(),
            name: text("name"),
            namespace: text("namespace"),
        };
        if !text("generateName").is_empty() {
            let owner = meta
                .and_then(|m| m.get("ownerReferences"))
                .and_then(Value::as_array)
                .and_then(|refs| {
                    refs.iter()
                        .find(|r| r.get("controller").and_then(Value::as_bool) == Some(true))
                });
            if let Some(o) = owner {
                let s = |k: &str| o.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                w.api_version = s("apiVersion");
                w.kind = s("kind");
                w.name = s("name");
                let hash = label("pod-template-hash");
                if w.kind == "ReplicaSet" && !hash.is_empty() && w.name.ends_with(&hash) {
                    if let Some(n) = w.name.strip_suffix(&format!("-{hash}")) {
                        w.name = n.to_string();
                        w.kind = "Deployment".into();
                    }
                } else if w.kind == "ReplicationController" && !label("deploymentconfig").is_empty()
                {
                    w.name = label("deploymentconfig");
                    w.kind = "DeploymentConfig".into();
                } else if w.kind == "Job" {
                    if let Some((cron, digits)) = w.name.rsplit_once('-') {
                        if (8..=10).contains(&digits.len())
                            && digits.bytes().all(|b| b.is_ascii_digit())
                        {
                            w.name = cron.to_string();
                            w.kind = "CronJob".into();
                            w.api_version = "batch/v1".into();
                        }
                    }
                }
            }
        }
        if w.name.is_empty() {
            w.name = text("name");
        }
        w
    }
}

/// What [`render`] produced: the injected pod's labels, annotations and rewritten spec
/// fields (everything else stays as sent), and anything the author should hear about.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub labels: Map<String, Value>,
    pub annotations: Map<String, Value>,
    /// `containers`, `initContainers`, `volumes`, `imagePullSecrets` as they become.
    pub spec: Vec<(&'static str, Json)>,
    pub warnings: Vec<String>,
    pub native: bool,
    /// Which of Istio's templates rendered it.
    pub template: Template,
}

impl Rendered {
    /// The injected pod's proxy container.
    pub fn proxy(&self, name: &str) -> Option<&Json> {
        self.spec
            .iter()
            .filter(|(k, _)| *k == "containers" || *k == "initContainers")
            .filter_map(|(_, v)| match v {
                Json::Array(list) => Some(list),
                _ => None,
            })
            .flatten()
            .find(|c| c.str_member("name") == Some(name))
    }
}

/// podwire's own overrides of the proxy container (the config file's `proxy` section).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub name: String,
    pub image: Option<String>,
    pub uid: u32,
    pub gid: u32,
    /// A partial container merged over the template (imagePullPolicy, args, env, ports,
    /// resources as given in the config file).
    pub container: Option<Value>,
}

fn ann<'a>(a: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    a.get(k).and_then(Value::as_str)
}

/// Whether key `k` is `name` after Prometheus's label-name sanitising: `prometheus.io/scrape`,
/// `prometheus.io.scrape` and `prometheus-io/scrape` all read as `prometheus_io_scrape`, and
/// Istio's webhook matches the pod's annotations the same way.
fn sanitised_is(k: &str, name: &str) -> bool {
    // Compared as it goes: no string is built per annotation on the request path.
    k.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .eq(name.chars())
}

/// The pod's annotations (key, value) whose sanitised key is `name`.
fn prometheus_annotations<'a>(
    a: &'a Map<String, Value>,
    name: &'a str,
) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
    a.iter()
        .filter(move |(k, _)| sanitised_is(k, name))
        .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
}

/// Go's `strconv.ParseBool`.
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// Ports the proxy owns; scraping one of them would read Istio itself, not the app
/// (pilot-agent's list, with why).
const RESERVED_PORTS: [(u16, &str); 9] = [
    (15000, "Envoy admin"),
    (15001, "outbound traffic capture"),
    (15004, "pilot debug"),
    (15006, "inbound traffic capture"),
    (15008, "HBONE tunnel"),
    (15020, "pilot-agent status / merged Prometheus"),
    (15021, "Envoy health"),
    (15053, "DNS proxy"),
    (15090, "Envoy Prometheus (already merged)"),
];

/// The app's scrape settings for pilot-agent's metrics merge (`ISTIO_PROMETHEUS_ANNOTATIONS`,
/// the JSON Istio's webhook writes), checked as Istio checks them: each port 1-65535, neither
/// the agent's `target` nor one the proxy owns. `None` when the pod sets none.
fn prometheus_scrape_config(a: &Map<String, Value>, target: &str) -> Result<Option<String>> {
    let first = |name| prometheus_annotations(a, name).next();
    let mut port = first("prometheus_io_port");
    let mut path = first("prometheus_io_path").map(|(_, v)| v);
    let scrape = first("prometheus_io_scrape").map(|(_, v)| v);
    let mut targets = Vec::new();
    if let Some((key, raw)) = first("prometheus_istio_io_scrape_targets") {
        for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (p, rest) = entry.split_once(':').unwrap_or((entry, ""));
            let (p, rest) = (p.trim(), rest.trim());
            if p.is_empty() {
                return Err(invalid(
                    key,
                    raw,
                    format!("empty port in scrape target {entry:?}"),
                ));
            }
            targets.push((key, raw, p, if rest.is_empty() { "/metrics" } else { rest }));
        }
    }
    // `raw`: the annotation's whole value, quoted in the error.
    let check = |key: &str, raw: &str, p: &str| -> Result<()> {
        let n = match p.parse::<u16>() {
            Ok(n) if n != 0 => n,
            _ => return Err(invalid(key, raw, format!("{p:?} is not a port 1-65535"))),
        };
        if n.to_string() == target {
            return Err(invalid(key, raw, format!("port {n} is the agent's own")));
        }
        if let Some((_, why)) = RESERVED_PORTS.iter().find(|(r, _)| *r == n) {
            return Err(invalid(
                key,
                raw,
                format!("port {n} is reserved for Istio ({why}) and cannot be scraped"),
            ));
        }
        Ok(())
    };
    if let Some((key, _, p, first_path)) = targets.first().copied() {
        // Old agents read only port and path: the first target's.
        port = Some((key, p));
        path = Some(first_path);
        for (key, raw, p, _) in &targets {
            check(key, raw, p)?;
        }
    } else if let Some((key, p)) = port.filter(|(_, p)| !p.is_empty()) {
        check(key, p, p)?;
    }
    // Empty values count as unset (pilot-agent's IsEmpty).
    let unset = |v: Option<&str>| v.is_none_or(str::is_empty);
    if unset(scrape) && unset(port.map(|(_, p)| p)) && unset(path) {
        return Ok(None);
    }
    // Istio's field order (pilot-agent's PrometheusScrapeConfiguration).
    let q = |v: &str| Value::from(v).to_string();
    let mut cfg = format!(
        "{{\"scrape\":{},\"path\":{},\"port\":{}",
        q(scrape.unwrap_or("")),
        q(path.unwrap_or("")),
        q(port.map_or("", |(_, p)| p))
    );
    if !targets.is_empty() {
        let list: Vec<String> = targets
            .iter()
            .map(|(_, _, port, path)| format!("{{\"port\":{},\"path\":{}}}", q(port), q(path)))
            .collect();
        cfg.push_str(&format!(",\"targets\":[{}]", list.join(",")));
    }
    cfg.push('}');
    Ok(Some(cfg))
}

fn invalid(key: &str, value: &str, reason: impl Into<String>) -> Error {
    Error::InvalidAnnotation {
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// A value placed in an argument or env var: printable, no spaces, bounded.
fn check_word(annotations: &Map<String, Value>, key: &str, extra: &str) -> Result<()> {
    if let Some(v) = ann(annotations, key) {
        let ok = !v.is_empty()
            && v.len() <= 256
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:,".contains(c) || extra.contains(c));
        if !ok {
            return Err(invalid(
                key,
                v,
                "only letters, digits and - _ . : , are allowed here",
            ));
        }
    }
    Ok(())
}

fn check_int(annotations: &Map<String, Value>, key: &str, max: i64) -> Result<Option<i64>> {
    match ann(annotations, key) {
        None => Ok(None),
        Some(v) => match v.trim().parse::<i64>() {
            Ok(n) if (0..=max).contains(&n) => Ok(Some(n)),
            _ => Err(invalid(key, v, format!("expected an integer 0-{max}"))),
        },
    }
}

fn check_bool(annotations: &Map<String, Value>, key: &str) -> Result<Option<bool>> {
    match ann(annotations, key) {
        None => Ok(None),
        // Go's strconv.ParseBool, which Istio uses for these.
        Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(Some(true)),
        Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(Some(false)),
        Some(v) => Err(invalid(key, v, "expected true or false")),
    }
}

/// Strategic merge of a partial object over another, as the API server's strategic merge
/// patch does for a Container: mappings merge, the lists Kubernetes merges by key (`env` by
/// name, `ports` by containerPort, `volumeMounts` by mountPath) merge by key, other lists and
/// scalars are replaced.
pub fn merge_over(base: &mut Value, overlay: &Value) {
    match (base, overlay) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, ov) in o {
                merge_member(b, k, ov);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// [`merge_over`] of one overlay member `k`: all it reads and changes of `b` is `b[k]`.
fn merge_member(b: &mut Map<String, Value>, k: &str, ov: &Value) {
    let key = match k {
        "env" => Some("name"),
        "ports" => Some("containerPort"),
        "volumeMounts" => Some("mountPath"),
        "volumeDevices" => Some("devicePath"),
        _ => None,
    };
    match (b.get_mut(k), key, ov) {
        (Some(Value::Array(ba)), Some(key), Value::Array(oa)) => {
            for item in oa {
                let id = item.get(key);
                match ba.iter_mut().find(|x| id.is_some() && x.get(key) == id) {
                    Some(x) => merge_over(x, item),
                    None => ba.push(item.clone()),
                }
            }
        }
        (Some(bv @ Value::Object(_)), _, Value::Object(_)) => merge_over(bv, ov),
        _ => {
            b.insert(k.to_string(), ov.clone());
        }
    }
}

/// [`merge_over`] on the proxy container as rendered, member by member: only the members the
/// overlay names are read back from their shared form.
fn merge_into(proxy: &mut Json, overlay: &Value) {
    match (proxy, overlay) {
        (Json::Object(c), Value::Object(o)) => {
            for (k, ov) in o {
                let mut one = Map::new();
                if let Some(cur) = c.remove(k) {
                    one.insert(k.clone(), cur.to_value());
                }
                merge_member(&mut one, k, ov);
                if let Some(v) = one.remove(k) {
                    c.insert(k.clone(), Json::Value(v));
                }
            }
        }
        (p, o) => {
            let mut v = p.to_value();
            merge_over(&mut v, o);
            *p = Json::Value(v);
        }
    }
}

/// Merge a ProxyConfig fragment (mesh defaults, then `proxy.istio.io/config`) as Istio's
/// proto merge does: messages and maps merge, lists and scalars are replaced.
fn merge_proxy_config(base: &mut Value, overlay: &Value) {
    match (base, overlay) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, ov) in o {
                match b.get_mut(k) {
                    Some(bv @ Value::Object(_)) if ov.is_object() => merge_proxy_config(bv, ov),
                    _ => {
                        b.insert(k.clone(), ov.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// Istio's `cleanProxyConfig`: the fields equal to the proxy's own defaults are left out of
/// `PROXY_CONFIG` (the agent applies them anyway).
fn clean_proxy_config(pc: &Value) -> Value {
    let Value::Object(m) = pc else {
        return json!({});
    };
    let default_of = |k: &str| -> Option<Value> {
        Some(match k {
            "configPath" => json!("./etc/istio/proxy"),
            "binaryPath" => json!("/usr/local/bin/envoy"),
            "controlPlaneAuthPolicy" => json!("MUTUAL_TLS"),
            "serviceCluster" => json!("istio-proxy"),
            "drainDuration" => json!("45s"),
            "terminationDrainDuration" => json!("5s"),
            "discoveryAddress" => json!("istiod.istio-system.svc:15012"),
            "envoyMetricsService" => json!({}),
            "envoyAccessLogService" => json!({}),
            "tracing" => json!({"zipkin": {"address": "zipkin.istio-system:9411"}}),
            "proxyAdminPort" => json!(15000),
            "statNameLength" => json!(189),
            "statusPort" => json!(15020),
            "concurrency" => json!(2),
            "proxyMetadata" => json!({}),
            _ => return None,
        })
    };
    Value::Object(
        m.iter()
            .filter(|(k, v)| default_of(k).as_ref() != Some(v) && !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    )
}

/// Istio's `excludeInboundPort`: the status port added to the excluded inbound ports.
fn exclude_inbound_port(port: &str, excluded: &str) -> String {
    let port = port.trim();
    if port.is_empty() || port == "0" {
        return excluded.to_string();
    }
    let mut out = Vec::new();
    for p in excluded.split(',') {
        if p == port {
            return excluded.to_string();
        }
        let p = p.trim();
        if !p.is_empty() {
            out.push(p.to_string());
        }
    }
    out.push(port.to_string());
    out.join(",")
}

fn trim_canonical(s: &str) -> String {
    let t: String = s.chars().take(63).collect();
    t.trim_matches(|c| c == '-' || c == '_' || c == '.')
        .to_string()
}

/// Go's `encoding/json` shape of a ContainerPort (field order name, hostPort, containerPort,
/// protocol, hostIP; empty fields left out), as Istio's `structToJSON` writes it.
fn port_json(p: &Value) -> Option<String> {
    let mut parts = Vec::new();
    let str_field = |k: &str| p.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
    let int_field = |k: &str| p.get(k).and_then(Value::as_i64).filter(|n| *n != 0);
    if let Some(n) = str_field("name") {
        parts.push(format!("\"name\":{}", Value::String(n.into())));
    }
    if let Some(n) = int_field("hostPort") {
        parts.push(format!("\"hostPort\":{n}"));
    }
    parts.push(format!(
        "\"containerPort\":{}",
        p.get("containerPort").and_then(Value::as_i64).unwrap_or(0)
    ));
    if let Some(n) = str_field("protocol") {
        parts.push(format!("\"protocol\":{}", Value::String(n.into())));
    }
    if let Some(n) = str_field("hostIP") {
        parts.push(format!("\"hostIP\":{}", Value::String(n.into())));
    }
    Some(format!("{{{}}}", parts.join(",")))
}

pub(super) fn env(name: &str, value: impl Into<String>) -> Value {
    json!({"name": name, "value": value.into()})
}

fn env_field(name: &str, path: &str) -> Value {
    json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}})
}

fn env_resource(name: &str, resource: &str) -> Value {
    json!({"name": name, "valueFrom": {"resourceFieldRef": {"resource": resource, "divisor": "1"}}})
}

fn containers(spec: &Value, key: &str) -> Vec<Value> {
    // Only the lists injection rewrites are copied.
    spec.get(key)
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

pub(super) fn name_of(c: &Value) -> &str {
    c.get("name").and_then(Value::as_str).unwrap_or("")
}

/// The parts of the sidecar that depend on the settings and podwire's proxy overrides alone:
/// built and serialized once per settings change (with [`super::patch::RenderInputs`]) and
/// shared by every pod's patch, instead of being built from `json!` literals per pod.
/// `render` has no other source for them.
#[derive(Debug, Clone, PartialEq)]
pub struct Prebuilt {
    /// Env up to `ISTIO_CPU_LIMIT`, in the template's order.
    env_head: Vec<Raw>,
    /// `PROXY_CONFIG` for a pod without its own `proxy.istio.io/config`.
    proxy_config_env: Raw,
    gomemlimit_env: Raw,
    node_name_env: Raw,
    /// The securityContext for a pod without, and with, its own seccomp profile.
    security_context: [Raw; 2],
    /// Args and readiness probe for a pod without log level or readiness annotations.
    args: Raw,
    readiness_probe: Raw,
    ports: Raw,
    startup_probe: Option<Raw>,
    /// Mounts before the custom-bootstrap one, and after it.
    mounts_head: Vec<Raw>,
    mounts_tail: Vec<Raw>,
    /// Volumes (name, volume) before the custom-bootstrap one, and after it (up to
    /// `istio-ca-crl`).
    volumes_head: Vec<(String, Raw)>,
    volumes_tail: Vec<(String, Raw)>,
}

fn raws(list: &[Value]) -> Vec<Raw> {
    list.iter().map(Raw::new).collect()
}

fn named_raws(list: &[Value]) -> Vec<(String, Raw)> {
    list.iter()
        .map(|v| (name_of(v).to_string(), Raw::new(v)))
        .collect()
}

/// The proxy's args; `levels`: the pod's log, component log and agent log level annotations.
fn proxy_args(s: &Resolved, levels: [Option<&str>; 3], template: Template) -> Value {
    let [log, component, agent] = levels;
    let mut args = vec![
        json!("proxy"),
        json!(match template {
            Template::Sidecar | Template::GrpcAgent => "sidecar",
            Template::Gateway => "router",
        }),
        json!("--domain"),
        json!(format!("$(POD_NAMESPACE).svc.{}", s.cluster_domain)),
        json!(format!("--proxyLogLevel={}", log.unwrap_or(&s.log_level))),
        json!(format!(
            "--proxyComponentLogLevel={}",
            component.unwrap_or(&s.component_log_level)
        )),
        json!(format!(
            "--log_output_level={}",
            agent.unwrap_or(&s.agent_log_level)
        )),
    ];
    if s.sts_port != 0 {
        args.push(json!(format!("--stsPort={}", s.sts_port)));
    }
    if s.log_as_json {
        args.push(json!("--log_as_json"));
    }
    if !s.outlier_log_path.is_empty() && template == Template::Sidecar {
        args.push(json!(format!("--outlierLogPath={}", s.outlier_log_path)));
    }
    Value::Array(args)
}

/// The proxy's readiness probe on `port`; `timing`: the pod's initial delay, period and
/// failure threshold annotations.
fn readiness_probe(s: &Resolved, timing: [Option<i64>; 3], port: i64) -> Value {
    let [delay, period, failure] = timing;
    drop_zero(json!({
        "httpGet": {"path": "/healthz/ready", "port": port},
        "initialDelaySeconds": delay.unwrap_or(s.readiness_initial_delay),
        "periodSeconds": period.unwrap_or(s.readiness_period),
        "timeoutSeconds": 3,
        "failureThreshold": failure.unwrap_or(s.readiness_failure_threshold),
    }))
}

/// The proxy's securityContext; `pod_seccomp`: the pod sets its own seccomp profile.
fn security_context(s: &Resolved, o: &Overrides, pod_seccomp: bool) -> Value {
    let mut sc = json!({
        "allowPrivilegeEscalation": s.privileged,
        "capabilities": {"drop": ["ALL"]},
        "privileged": s.privileged,
        "readOnlyRootFilesystem": true,
        "runAsNonRoot": true,
        "runAsUser": o.uid,
        "runAsGroup": o.gid,
    });
    // Pod Security "restricted" needs a seccomp profile on every container unless the pod
    // sets one: RuntimeDefault when Istio's values name none.
    match &s.seccomp_profile {
        Some(p) => sc["seccompProfile"] = p.clone(),
        None if !pod_seccomp => sc["seccompProfile"] = json!({"type": "RuntimeDefault"}),
        None => {}
    }
    sc
}

impl Prebuilt {
    pub fn new(s: &Resolved, o: &Overrides) -> Self {
        let mut env_head = Vec::new();
        if s.inbound_localhost {
            env_head.push(env(LEGACY_LOCALHOST, "true"));
        }
        env_head.push(env("PILOT_CERT_PROVIDER", &s.pilot_cert_provider));
        env_head.push(env("CA_ADDR", &s.ca_address));
        env_head.push(env_field("POD_NAME", "metadata.name"));
        env_head.push(env_field("POD_NAMESPACE", "metadata.namespace"));
        env_head.push(env_field("INSTANCE_IP", "status.podIP"));
        env_head.push(env_field("SERVICE_ACCOUNT", "spec.serviceAccountName"));
        env_head.push(env_field("HOST_IP", "status.hostIP"));
        env_head.push(env_resource("ISTIO_CPU_LIMIT", "limits.cpu"));

        let mut mounts_head = vec![
            json!({"name": "workload-socket", "mountPath": "/var/run/secrets/workload-spiffe-uds"}),
            json!({"name": "credential-socket", "mountPath": "/var/run/secrets/credential-uds"}),
        ];
        if s.ca_name == "GkeWorkloadCertificate" {
            mounts_head.push(json!({"name": "gke-workload-certificate", "mountPath": "/var/run/secrets/workload-spiffe-credentials", "readOnly": true}));
        } else {
            mounts_head.push(json!({"name": "workload-certs", "mountPath": "/var/run/secrets/workload-spiffe-credentials"}));
        }
        if s.pilot_cert_provider == "istiod" {
            mounts_head
                .push(json!({"mountPath": "/var/run/secrets/istio", "name": "istiod-ca-cert"}));
            mounts_head
                .push(json!({"mountPath": "/var/run/secrets/istio/crl", "name": "istio-ca-crl"}));
        }
        mounts_head.push(json!({"mountPath": "/var/lib/istio/data", "name": "istio-data"}));
        let mut mounts_tail = vec![
            json!({"mountPath": "/etc/istio/proxy", "name": "istio-envoy"}),
            json!({"mountPath": "/var/run/secrets/tokens", "name": "istio-token"}),
        ];
        if s.mount_mtls_certs {
            mounts_tail
                .push(json!({"mountPath": "/etc/certs/", "name": "istio-certs", "readOnly": true}));
        }
        mounts_tail.push(json!({"name": "istio-podinfo", "mountPath": "/etc/istio/pod"}));

        let mut volumes_head = vec![
            json!({"name": "workload-socket", "emptyDir": {}}),
            json!({"name": "credential-socket", "emptyDir": {}}),
        ];
        if s.ca_name == "GkeWorkloadCertificate" {
            volumes_head.push(json!({"name": "gke-workload-certificate", "csi": {"driver": "workloadcertificates.security.cloud.google.com"}}));
        } else {
            volumes_head.push(json!({"name": "workload-certs", "emptyDir": {}}));
        }
        let mut volumes_tail = vec![
            json!({"name": "istio-envoy", "emptyDir": {"medium": "Memory"}}),
            json!({"name": "istio-data", "emptyDir": {}}),
            json!({"name": "istio-podinfo", "downwardAPI": {"items": [
                {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}},
            ]}}),
            json!({"name": "istio-token", "projected": {"sources": [
                {"serviceAccountToken": {"path": "istio-token", "expirationSeconds": 43200, "audience": s.sds_audience}}
            ]}}),
        ];
        let bundle = if s.trust_bundle_name.is_empty() {
            None
        } else {
            Some(s.trust_bundle_name.as_str())
        };
        if s.pilot_cert_provider == "istiod" {
            if s.cluster_trust_bundle {
                volumes_tail.push(
                    json!({"name": "istiod-ca-cert", "projected": {"sources": [{"clusterTrustBundle": {
                    "name": format!("istio.io:istiod-ca:{}", bundle.unwrap_or("root-cert")),
                    "path": "root-cert.pem"}}]}}),
                );
            } else {
                volumes_tail.push(json!({"name": "istiod-ca-cert", "configMap": {"name": bundle.unwrap_or("istio-ca-root-cert")}}));
            }
        }
        let crl = if s.crl_config_map.is_empty() {
            "istio-ca-crl"
        } else {
            &s.crl_config_map
        };
        volumes_tail
            .push(json!({"name": "istio-ca-crl", "configMap": {"name": crl, "optional": true}}));

        Prebuilt {
            env_head: raws(&env_head),
            proxy_config_env: Raw::new(&env("PROXY_CONFIG", s.default_proxy_config_env.clone())),
            gomemlimit_env: Raw::new(&env_resource("GOMEMLIMIT", "limits.memory")),
            node_name_env: Raw::new(&env_field("ISTIO_META_NODE_NAME", "spec.nodeName")),
            security_context: [false, true].map(|own| Raw::new(&security_context(s, o, own))),
            args: Raw::new(&proxy_args(s, [None; 3], Template::Sidecar)),
            readiness_probe: Raw::new(&readiness_probe(s, [None; 3], SIDECAR_READY_PORT)),
            ports: Raw::new(
                &json!([{"containerPort": 15090, "protocol": "TCP", "name": "http-envoy-prom"}]),
            ),
            startup_probe: s.startup_enabled.then(|| {
                Raw::new(&json!({
                    "httpGet": {"path": "/healthz/ready", "port": 15021},
                    "periodSeconds": 1,
                    "timeoutSeconds": 3,
                    "failureThreshold": s.startup_failure_threshold,
                }))
            }),
            mounts_head: raws(&mounts_head),
            mounts_tail: raws(&mounts_tail),
            volumes_head: named_raws(&volumes_head),
            volumes_tail: named_raws(&volumes_tail),
        }
    }
}

/// Per-pod annotations of the sidecar template that Istio's gateway template does not read.
const GATEWAY_IGNORES: [&str; 11] = [
    "sidecar.istio.io/proxyCPU",
    "sidecar.istio.io/proxyMemory",
    "sidecar.istio.io/proxyCPULimit",
    "sidecar.istio.io/proxyMemoryLimit",
    "sidecar.istio.io/userVolume",
    "sidecar.istio.io/userVolumeMount",
    "sidecar.istio.io/interceptionMode",
    "sidecar.istio.io/nativeSidecar",
    "readiness.status.sidecar.istio.io/initialDelaySeconds",
    "readiness.status.sidecar.istio.io/periodSeconds",
    "readiness.status.sidecar.istio.io/failureThreshold",
];

/// The sidecar's readiness port (Envoy's health listener).
const SIDECAR_READY_PORT: i64 = 15021;

/// An interception mode Istio knows.
fn interception_mode_known(mode: &str) -> bool {
    ["REDIRECT", "TPROXY", "NONE"].contains(&mode)
}

/// Per-pod annotations of the sidecar template that Istio's grpc-agent template does not read
/// (it sets `rewriteAppHTTPProbers: "false"` itself: gRPC apps' probes are left as written).
const GRPC_IGNORES: [&str; 3] = [
    "sidecar.istio.io/interceptionMode",
    "sidecar.istio.io/nativeSidecar",
    "sidecar.istio.io/rewriteAppHTTPProbers",
];

/// Which of Istio's injection templates a pod gets (`inject.istio.io/templates`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Template {
    /// `sidecar`, the default: the proxy beside the app, its traffic redirected.
    Sidecar,
    /// `gateway`: the pod *is* the proxy (`proxy router`, Istio's gateway charts); nothing is
    /// redirected and podwire-cni leaves it alone.
    Gateway,
    /// `grpc-agent`: proxyless gRPC, the agent without Envoy beside apps that speak xDS
    /// themselves ([`super::grpc_agent`]); nothing is redirected and podwire-cni leaves it alone.
    GrpcAgent,
}

impl Template {
    /// Every template podwire renders, by Istio's name.
    const NAMED: [(&'static str, Template); 3] = [
        ("sidecar", Template::Sidecar),
        ("gateway", Template::Gateway),
        ("grpc-agent", Template::GrpcAgent),
    ];

    /// The pod's choice; any template podwire does not render is refused, as Istio refuses
    /// one it does not have (a gateway given a sidecar would capture its own traffic).
    fn of(a: &Map<String, Value>) -> Result<Template> {
        ann(a, TEMPLATES).map_or(Ok(Template::Sidecar), Template::parse)
    }

    /// An `inject.istio.io/templates` value.
    pub fn parse(t: &str) -> Result<Template> {
        let known = |n: &str| Self::NAMED.iter().find(|(k, _)| *k == n).map(|(_, t)| *t);
        let names: Vec<&str> = t.split(',').map(str::trim).collect();
        if names.iter().any(|n| n.is_empty()) {
            return Err(invalid(
                TEMPLATES,
                t,
                "a template name is empty (expected `sidecar`, `gateway` or `grpc-agent`)",
            ));
        }
        let Some(named) = names.iter().map(|n| known(n)).collect::<Option<Vec<_>>>() else {
            return Err(invalid(
                TEMPLATES,
                t,
                "podwire renders Istio's `sidecar`, `gateway` and `grpc-agent` templates only \
                 (`grpc-simple` or a custom template needs Istio's own injector)",
            ));
        };
        match named.as_slice() {
            [one, rest @ ..] if rest.iter().all(|r| r == one) => Ok(*one),
            _ => Err(invalid(
                TEMPLATES,
                t,
                "`sidecar`, `gateway` and `grpc-agent` cannot be combined: a pod is one of them",
            )),
        }
    }

    /// Istio's name for it.
    pub fn name(self) -> &'static str {
        Template::NAMED
            .iter()
            .find(|(_, t)| *t == self)
            .map_or("sidecar", |(n, _)| n)
    }

    /// Whether the pod's proxy is fed its traffic by podwire-cni. A gateway receives its
    /// traffic directly and a proxyless gRPC app talks to the mesh itself: podwire-cni leaves
    /// both alone, by design.
    pub fn redirected(self) -> bool {
        self == Template::Sidecar
    }
}

/// Render Istio's sidecar (or gateway) for `pod` (a Pod object as the API server sends it, or
/// a pod template with its metadata). Checks every annotation the template reads before
/// using it.
pub fn render(
    pod: &Value,
    workload: &Workload,
    s: &Resolved,
    o: &Overrides,
    extra_annotations: &BTreeMap<String, String>,
    pre: &Prebuilt,
) -> Result<Rendered> {
    let empty = Map::new();
    if !pod.is_object() {
        return Err(Error::InvalidPod {
            reason: "expected an object".into(),
        });
    }
    // Borrowed from the pod; copied once each, into what the pod's maps become.
    let a: &Map<String, Value> = pod
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let labels: &Map<String, Value> = pod
        .get("metadata")
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let label = |k: &str| {
        labels
            .get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let mut warnings = Vec::new();

    // Every annotation value the template places somewhere is checked first.
    for key in [
        "sidecar.istio.io/logLevel",
        "sidecar.istio.io/componentLogLevel",
        "sidecar.istio.io/agentLogLevel",
        "sidecar.istio.io/proxyImageType",
        "sidecar.istio.io/interceptionMode",
    ] {
        check_word(a, key, "")?;
    }
    check_word(a, "sidecar.istio.io/proxyImage", "/@+")?;
    check_word(a, "sidecar.istio.io/bootstrapOverride", "")?;
    let status_port_ann = check_int(a, "status.sidecar.istio.io/port", 65535)?;
    let ready_delay = check_int(
        a,
        "readiness.status.sidecar.istio.io/initialDelaySeconds",
        86400,
    )?;
    let ready_period = check_int(a, "readiness.status.sidecar.istio.io/periodSeconds", 86400)?;
    let ready_failure = check_int(
        a,
        "readiness.status.sidecar.istio.io/failureThreshold",
        100000,
    )?;
    let native_ann = check_bool(a, "sidecar.istio.io/nativeSidecar")?;
    let rewrite_ann = check_bool(a, "sidecar.istio.io/rewriteAppHTTPProbers")?;
    let merge_ann = check_bool(a, "prometheus.istio.io/merge-metrics")?;
    let template = Template::of(a)?;
    let gateway = template == Template::Gateway;
    let grpc = template == Template::GrpcAgent;
    let ignored: &[&str] = match template {
        Template::Sidecar => &[],
        Template::Gateway => &GATEWAY_IGNORES,
        Template::GrpcAgent => &GRPC_IGNORES,
    };
    for k in ignored {
        if a.contains_key(*k) {
            warnings.push(format!(
                "annotation {k} is ignored: Istio's {} template does not read it",
                template.name()
            ));
        }
    }
    if grpc {
        if let Some(k) = a
            .keys()
            .find(|k| k.starts_with("traffic.sidecar.istio.io/"))
        {
            warnings.push(format!(
                "annotation {k} is ignored: a proxyless gRPC pod's traffic is not redirected"
            ));
        }
    }
    for (k, why) in REFUSED_ANNOTATIONS {
        if a.contains_key(k) {
            warnings.push(format!("annotation {k} is ignored: {why}"));
        }
    }

    // ProxyConfig: mesh defaults, then the pod's proxy.istio.io/config.
    // Borrowed from the settings unless the pod has its own.
    let mut pc = std::borrow::Cow::Borrowed(&s.default_config);
    let pod_pc = ann(a, "proxy.istio.io/config").is_some();
    if let Some(text) = ann(a, "proxy.istio.io/config") {
        let parsed: Value = serde_yaml_ng::from_str(text)
            .map_err(|e| invalid("proxy.istio.io/config", text, format!("not YAML: {e}")))?;
        if !(parsed.is_object() || parsed.is_null()) {
            return Err(invalid(
                "proxy.istio.io/config",
                text,
                "expected a ProxyConfig mapping",
            ));
        }
        merge_proxy_config(pc.to_mut(), &parsed);
    }
    let pc_str = |k: &str| pc.get(k).and_then(Value::as_str).unwrap_or("");
    let interception = ann(a, "sidecar.istio.io/interceptionMode")
        .map(str::to_string)
        .unwrap_or_else(|| match pc_str("interceptionMode") {
            "" => "REDIRECT".to_string(),
            m => m.to_string(),
        });
    // The modes Istio knows (its webhook refuses any other, whatever the template); the
    // mesh's defaultConfig was checked with the settings, so a bad one is the pod's.
    if !interception_mode_known(&interception) {
        let (key, why) = match ann(a, "sidecar.istio.io/interceptionMode") {
            Some(_) => ("sidecar.istio.io/interceptionMode", String::new()),
            None => (
                "proxy.istio.io/config",
                format!("interceptionMode {interception:?}: "),
            ),
        };
        return Err(invalid(
            key,
            ann(a, key).unwrap_or(""),
            format!("{why}expected REDIRECT, TPROXY or NONE"),
        ));
    }
    let metadata: BTreeMap<String, String> = match pc.get("proxyMetadata") {
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), v)
            })
            .collect(),
        _ => BTreeMap::new(),
    };
    let hold_pc = pc
        .get("holdApplicationUntilProxyStarts")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    // The gateway and grpc-agent templates always put the proxy in `containers`.
    let native = template == Template::Sidecar
        && match native_ann {
            Some(n) => n,
            None => match s.native {
                NativeMode::Enabled => true,
                NativeMode::Disabled => false,
                NativeMode::Auto => s.nodes.as_ref().is_none_or(|n| {
                    n.native_on(
                        pod.pointer("/spec/nodeName")
                            .and_then(Value::as_str)
                            .unwrap_or(""),
                    )
                }),
            },
        };
    let hold = (hold_pc || s.hold_values) && !native && template == Template::Sidecar;
    let status_port = status_port_ann
        .map(|p| p.to_string())
        .unwrap_or_else(|| s.status_port.clone());

    let no_spec = json!({});
    // Borrowed: a pod's unknown fields can be large, and are never copied.
    let spec = pod
        .get("spec")
        .filter(|s| s.is_object())
        .unwrap_or(&no_spec);
    let mut app = containers(spec, "containers");
    let mut inits = containers(spec, "initContainers");
    // The pod's own istio-proxy (customisation), taken out: it is merged over the template.
    // Its nulls read as absent, as Istio's typed decode has them: `securityContext: null` or
    // `restartPolicy: null` keeps the template's (it used to wipe the proxy's uid, which the
    // plugin then exempted while the proxy ran as the pod's: a traffic loop).
    let mut own: Option<Value> = None;
    for list in [&mut app, &mut inits] {
        if let Some(i) = list.iter().position(|c| name_of(c) == o.name) {
            own = Some(omit_nil(&list.remove(i)));
        }
    }
    // A pod's own istio-init / istio-validation customises Istio's init containers, which
    // podwire replaces by podwire-cni: dropped, and said.
    inits.retain(|c| {
        let n = name_of(c);
        let istio_init = n == "istio-init" || n == "istio-validation";
        if istio_init {
            warnings.push(format!(
                "init container {n} is dropped: it customises Istio's {n}, which podwire \
                 replaces by podwire-cni"
            ));
        }
        !istio_init
    });
    let app_names: Vec<String> = app.iter().map(|c| name_of(c).to_string()).collect();

    // Image.
    let image_type = ann(a, "sidecar.istio.io/proxyImageType")
        .map(str::to_string)
        .or_else(|| {
            member_at(&pc, &["image", "imageType"])
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| s.variant.clone());
    let proxy_image_setting = ann(a, "sidecar.istio.io/proxyImage").unwrap_or(&s.proxy_image);
    let image = if let Some(i) = &o.image {
        i.clone()
    } else if proxy_image_setting.contains('/') {
        proxy_image_setting.to_string()
    } else {
        let mut tag = s.tag.clone();
        if !image_type.is_empty() {
            for known in ["distroless", "debug"] {
                if let Some(t) = tag.strip_suffix(&format!("-{known}")) {
                    tag = t.to_string();
                    break;
                }
            }
            if image_type != "default" {
                tag = format!("{tag}-{image_type}");
            }
        }
        format!("{}/{}:{}", s.hub, s.proxy_image, tag)
    };

    // Args.
    let levels = [
        ann(a, "sidecar.istio.io/logLevel"),
        ann(a, "sidecar.istio.io/componentLogLevel"),
        ann(a, "sidecar.istio.io/agentLogLevel"),
    ];
    let args = if levels.iter().all(Option::is_none) && template == Template::Sidecar {
        Json::Raw(pre.args.clone())
    } else {
        Json::Value(proxy_args(s, levels, template))
    };

    // Env, in the template's order.
    let network = label("topology.istio.io/network")
        .map(str::to_string)
        .unwrap_or_else(|| s.network.clone());
    let mut envs: Vec<Json> = Vec::with_capacity(pre.env_head.len() + 16);
    if grpc {
        envs.extend(grpc_agent::env_first().map(Json::Value));
    }
    envs.extend(
        pre.env_head
            .iter()
            .filter(|e| match name_of(e.value()) {
                // Probe rewriting is the sidecar's and grpc-agent's; the gateway template has
                // no such variable.
                LEGACY_LOCALHOST => !gateway,
                // grpc-agent's agent sizes nothing from its limits.
                "ISTIO_CPU_LIMIT" => !grpc,
                _ => true,
            })
            .cloned()
            .map(Json::Raw),
    );
    envs.push(if pod_pc {
        Json::Value(env(
            "PROXY_CONFIG",
            format!("{}\n", clean_proxy_config(&pc)),
        ))
    } else {
        Json::Raw(pre.proxy_config_env.clone())
    });
    let mut ports_text = String::from("[");
    let mut first = true;
    // Every container of the pod as written, its own istio-proxy included (Istio's templates
    // loop over `.Spec.Containers`).
    for c in spec
        .get("containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for p in c
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(j) = port_json(p) {
                ports_text.push_str("\n    ");
                if !first {
                    ports_text.push(',');
                }
                ports_text.push_str(&j);
                first = false;
            }
        }
    }
    ports_text.push_str("\n]");
    envs.push(env("ISTIO_META_POD_PORTS", ports_text).into());
    // The two templates order these two differently.
    if gateway {
        envs.push(Json::Raw(pre.gomemlimit_env.clone()));
    }
    envs.push(env("ISTIO_META_APP_CONTAINERS", app_names.join(",")).into());
    if template == Template::Sidecar {
        envs.push(Json::Raw(pre.gomemlimit_env.clone()));
    }
    if s.cluster_name.is_empty() {
        envs.push(env("ISTIO_META_CLUSTER_ID", "Kubernetes").into());
    }
    envs.push(Json::Raw(pre.node_name_env.clone()));
    // The gateway template reads neither the interception annotation nor the workload-name
    // label.
    let pc_interception = match pc_str("interceptionMode") {
        "" => "REDIRECT",
        m => m,
    };
    if !grpc {
        envs.push(
            env(
                "ISTIO_META_INTERCEPTION_MODE",
                if gateway {
                    pc_interception
                } else {
                    &interception
                },
            )
            .into(),
        );
    }
    let workload_name = if template != Template::Sidecar {
        &workload.name
    } else {
        label("service.istio.io/workload-name").unwrap_or(&workload.name)
    };
    if !workload_name.is_empty() {
        envs.push(env("ISTIO_META_WORKLOAD_NAME", workload_name).into());
    }
    if !workload.api_version.is_empty() && !workload.name.is_empty() {
        let ns = if workload.namespace.is_empty() {
            "default"
        } else {
            &workload.namespace
        };
        envs.push(
            env(
                "ISTIO_META_OWNER",
                format!(
                    "kubernetes://apis/{}/namespaces/{ns}/{}s/{}",
                    workload.api_version,
                    workload.kind.to_lowercase(),
                    workload.name
                ),
            )
            .into(),
        );
    }
    let bootstrap = ann(a, "sidecar.istio.io/bootstrapOverride");
    // grpc-agent only mounts the volume (its agent runs no Envoy to bootstrap).
    if bootstrap.is_some() && !grpc {
        envs.push(
            env(
                "ISTIO_BOOTSTRAP_OVERRIDE",
                "/etc/istio/custom-bootstrap/custom_bootstrap.json",
            )
            .into(),
        );
    }
    let trust_domain = if s.mesh_trust_domain.is_empty() {
        s.trust_domain.clone()
    } else {
        s.mesh_trust_domain.clone()
    };
    if !s.mesh_id.is_empty() {
        envs.push(env("ISTIO_META_MESH_ID", &s.mesh_id).into());
    } else if !trust_domain.is_empty() {
        envs.push(env("ISTIO_META_MESH_ID", &trust_domain).into());
    }
    if !trust_domain.is_empty() {
        envs.push(env("TRUST_DOMAIN", &trust_domain).into());
    }
    for (k, v) in &metadata {
        envs.push(env(k, v).into());
    }
    if grpc {
        envs.extend(grpc_agent::env_last().map(Json::Value));
    }
    // Istio moves the cluster id and network it resolved to the end, sorted.
    if !s.cluster_name.is_empty() {
        envs.push(env("ISTIO_META_CLUSTER_ID", &s.cluster_name).into());
    }
    if !network.is_empty() {
        envs.push(env("ISTIO_META_NETWORK", &network).into());
    }

    // The container: settings-only parts shared as they were serialized once.
    let mut c: BTreeMap<String, Json> = BTreeMap::new();
    c.insert("name".into(), json!(o.name).into());
    c.insert("image".into(), json!(image).into());
    if native {
        c.insert("restartPolicy".into(), json!("Always").into());
    }
    c.insert(
        "ports".into(),
        if grpc {
            grpc_agent::ports().into()
        } else {
            Json::Raw(pre.ports.clone())
        },
    );
    c.insert("args".into(), args);
    if grpc {
        c.insert("lifecycle".into(), grpc_agent::lifecycle().into());
    } else if let Some(l) = &s.lifecycle {
        c.insert("lifecycle".into(), l.clone().into());
    } else if hold {
        c.insert(
            "lifecycle".into(),
            json!({"postStart": {"exec": {"command": ["pilot-agent", "wait"]}}}).into(),
        );
    } else if native {
        c.insert(
            "lifecycle".into(),
            json!({"preStop": {"exec": {"command": [
                "pilot-agent", "request", format!("--debug-port={status_port}"), "POST", "drain"
            ]}}})
            .into(),
        );
    }
    if let Some(p) = &s.image_pull_policy {
        c.insert("imagePullPolicy".into(), json!(p).into());
    }
    if grpc {
        // The template leaves the probe, the resources and the mounts out together when the
        // status port is 0.
        if status_port != "0" {
            let timing = [ready_delay, ready_period, ready_failure];
            c.insert(
                "readinessProbe".into(),
                readiness_probe(s, timing, grpc_agent::STATUS_PORT).into(),
            );
        }
    } else if status_port != "0" || gateway {
        // The gateway template does not read the readiness annotations.
        let timing = if gateway {
            [None; 3]
        } else {
            [ready_delay, ready_period, ready_failure]
        };
        let ready = if timing.iter().all(Option::is_none) {
            Json::Raw(pre.readiness_probe.clone())
        } else {
            Json::Value(readiness_probe(s, timing, SIDECAR_READY_PORT))
        };
        c.insert("readinessProbe".into(), ready);
        if let Some(p) = pre.startup_probe.as_ref().filter(|_| !gateway) {
            c.insert("startupProbe".into(), Json::Raw(p.clone()));
        }
    }
    let pod_seccomp = member_at(pod, &["spec", "securityContext", "seccompProfile"]).is_some();
    if grpc {
        // No securityContext: Istio's grpc-agent template sets none.
        if status_port != "0" {
            c.insert("resources".into(), proxy_resources(a, s)?.into());
        }
    } else if gateway {
        // The gateway template sets the owner only, and no resources: the gateway's chart
        // sets both on the Deployment's own istio-proxy container.
        c.insert(
            "securityContext".into(),
            json!({"runAsUser": o.uid, "runAsGroup": o.gid}).into(),
        );
    } else {
        c.insert(
            "securityContext".into(),
            Json::Raw(pre.security_context[usize::from(pod_seccomp)].clone()),
        );
        c.insert("resources".into(), proxy_resources(a, s)?.into());
    }
    // The sidecar's volumes (and their mounts) the other templates do not have: the gateway
    // no CRL; grpc-agent neither the CRL, the credential socket nor Envoy's own directory (its
    // `istio-xds` takes that place).
    let left_out = |name: &str| match template {
        Template::Sidecar => false,
        Template::Gateway => name == "istio-ca-crl",
        Template::GrpcAgent => {
            matches!(name, "istio-ca-crl" | "credential-socket" | "istio-envoy")
        }
    };
    let shared_mounts = |list: &[Raw]| -> Vec<Json> {
        list.iter()
            .filter(|r| !left_out(name_of(r.value())))
            .cloned()
            .map(Json::Raw)
            .collect()
    };
    let mut mounts = shared_mounts(&pre.mounts_head);
    if bootstrap.is_some() && !grpc {
        mounts.push(
            json!({"mountPath": "/etc/istio/custom-bootstrap", "name": "custom-bootstrap-volume"})
                .into(),
        );
    }
    if grpc {
        mounts.push(grpc_agent::xds_mount().into());
    }
    mounts.extend(shared_mounts(&pre.mounts_tail));
    for (name, m) in user_map(a, "sidecar.istio.io/userVolumeMount")?
        .into_iter()
        .filter(|_| !gateway)
    {
        let mut m = m;
        m["name"] = json!(name);
        mounts.push(m.into());
    }
    if !(grpc && status_port == "0") {
        c.insert("volumeMounts".into(), Json::Array(mounts));
    } else if a.contains_key("sidecar.istio.io/userVolumeMount") {
        // Istio's template would write them into the env list (or fail to parse).
        warnings.push(
            "annotation sidecar.istio.io/userVolumeMount is ignored: with \
             status.sidecar.istio.io/port \"0\" Istio's grpc-agent template mounts nothing"
                .to_string(),
        );
    }
    c.insert("env".into(), Json::Array(envs));

    // Volumes, with their names.
    let mut volumes: Vec<(Cow<str>, Json)> = shared(&pre.volumes_head)
        .filter(|(n, _)| !left_out(n))
        .collect();
    if let Some(b) = bootstrap {
        volumes.push((
            Cow::Borrowed("custom-bootstrap-volume"),
            json!({"name": "custom-bootstrap-volume", "configMap": {"name": b}}).into(),
        ));
    }
    if grpc {
        volumes.push((Cow::Borrowed("istio-xds"), grpc_agent::xds_volume().into()));
    }
    volumes.extend(shared(&pre.volumes_tail).filter(|(n, _)| !left_out(n)));
    if s.mount_mtls_certs {
        let sa = spec
            .get("serviceAccountName")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or("default");
        volumes.push((
            Cow::Borrowed("istio-certs"),
            json!({"name": "istio-certs", "secret": {"optional": true, "secretName": format!("istio.{sa}")}}).into(),
        ));
    }
    for (name, v) in user_map(a, "sidecar.istio.io/userVolume")?
        .into_iter()
        .filter(|_| !gateway)
    {
        let mut v = v;
        v["name"] = json!(name);
        volumes.push((Cow::Owned(name), v.into()));
    }

    // podwire's config file, then the pod's own container, over the template.
    let mut proxy = Json::Object(c);
    if let Some(cfg) = &o.container {
        merge_into(&mut proxy, cfg);
    }
    // The pod's containers the template also writes, as the pod had them: Istio records them
    // in proxy.istio.io/overrides (Go writes their empty resources).
    let mut overridden = Vec::new();
    if let Some(mut own) = own.clone() {
        if own.get("image").and_then(Value::as_str) == Some("auto") {
            own.as_object_mut().map(|m| m.remove("image"));
        }
        if own.get("resources").is_none() {
            own["resources"] = json!({});
        }
        overridden.push(own.clone());
        merge_into(&mut proxy, &own);
    }
    if grpc {
        // grpc-agent's template writes every app container (the bootstrap's env and mounts).
        overridden.extend(app.iter().cloned().map(|mut c| {
            if let Some(m) = c.as_object_mut() {
                m.entry("resources").or_insert_with(|| json!({}));
            }
            c
        }));
    }
    let overrides_annotation = (!overridden.is_empty()).then(|| {
        let list = if native {
            "initContainers"
        } else {
            "containers"
        };
        json!({ list: overridden }).to_string()
    });
    // Whether podwire-cni will feed this proxy its traffic, when the pod's own container,
    // podwire's config or proxyMetadata may have changed its args or env: a sidecar it leaves
    // alone, or a grpc-agent proxy whose Envoy was switched back on (the app's traffic then
    // goes to an Envoy configured for proxyless gRPC), is admitted as Istio does, but said.
    if !gateway
        && (own.is_some() || o.container.is_some() || metadata.contains_key("DISABLE_ENVOY"))
    {
        let merged = read_as_plugin(&proxy);
        match crate::mesh::proxy_left_alone(&merged, &crate::MeshProfile::istio()) {
            Some(why) if !grpc => warnings.push(format!(
                "podwire-cni will not redirect this pod: {why}; its traffic will not pass \
                 through the proxy"
            )),
            None if grpc => warnings.push(
                "podwire-cni will redirect this grpc-agent pod: its istio-proxy no longer sets \
                 DISABLE_ENVOY=true, so the app's traffic goes to an Envoy istiod configures \
                 for proxyless gRPC; remove the override unless that is meant"
                    .to_string(),
            ),
            _ => {}
        }
    }

    // Post-processing as Istio's webhook: Prometheus merge, probe rewrite.
    let mut annotations = a.clone();
    let scrape = prometheus_annotations(a, "prometheus_io_scrape")
        .find_map(|(_, v)| parse_bool(v))
        .unwrap_or(true);
    let mesh_status_port = pc
        .get("statusPort")
        .and_then(Value::as_i64)
        .unwrap_or(15020);
    if scrape && merge_ann.unwrap_or(s.prometheus_merge) {
        let target = mesh_status_port.to_string();
        let port = prometheus_annotations(a, "prometheus_io_port").next();
        if port.map(|(_, v)| v) != Some(target.as_str()) {
            let scrape_cfg = prometheus_scrape_config(a, &target)?;
            if let Some(cfg) = scrape_cfg {
                push_env(&mut proxy, env("ISTIO_PROMETHEUS_ANNOTATIONS", cfg));
            }
            // Every spelling Prometheus reads alike goes, so only podwire's remain.
            annotations.retain(|k, _| {
                ![
                    "prometheus_io_scrape",
                    "prometheus_io_port",
                    "prometheus_io_path",
                    "prometheus_istio_io_scrape_targets",
                ]
                .iter()
                .any(|name| sanitised_is(k, name))
            });
            annotations.insert("prometheus.io/port".into(), json!(target));
            annotations.insert("prometheus.io/path".into(), json!("/stats/prometheus"));
            annotations.insert("prometheus.io/scrape".into(), json!("true"));
        }
    }
    // The proxy serving merged metrics over mTLS (ENVOY_SECURE_MERGED_METRICS_PORT, set through
    // proxyMetadata or the pod's own container) is announced for scrapers, unless the pod
    // announces it itself.
    const SECURE_PORT_ENV: &str = "ENVOY_SECURE_MERGED_METRICS_PORT";
    if (metadata.contains_key(SECURE_PORT_ENV) || own.is_some() || o.container.is_some())
        && prometheus_annotations(a, "prometheus_istio_io_secure_port")
            .next()
            .is_none()
    {
        if let Some(port) = Node::of(&proxy)
            .get("env")
            .map(Node::items)
            .unwrap_or_default()
            .into_iter()
            .find(|e| e.get("name").and_then(Node::as_str) == Some(SECURE_PORT_ENV))
            .and_then(|e| e.get("value").and_then(Node::as_str))
            .filter(|v| !v.is_empty() && *v != "0")
        {
            annotations.insert("prometheus.istio.io/secure-port".into(), json!(port));
        }
    }
    if grpc {
        // The app shares the proxy's data and certificate mounts, as the template writes them.
        let mount = |names: &[&str]| {
            pre.mounts_head
                .iter()
                .map(Raw::value)
                .find(|m| names.contains(&name_of(m)))
                .cloned()
                .unwrap_or_default()
        };
        let data = mount(&["istio-data"]);
        let certs = mount(&["workload-certs", "gke-workload-certificate"]);
        for c in &mut app {
            grpc_agent::app_container(c, [&data, &certs]);
        }
    } else if rewrite_ann.unwrap_or(s.rewrite_app_probe) {
        let port = status_port_ann.unwrap_or(mesh_status_port);
        let probers = rewrite_probes(&mut inits, &mut app, port);
        if !probers.is_empty() {
            push_env(
                &mut proxy,
                env(
                    "ISTIO_KUBE_APP_PROBERS",
                    serde_json::to_string(&probers).unwrap_or_default(),
                ),
            );
        }
    }

    // Containers in Istio's order.
    let mut inits: Vec<Json> = inits.into_iter().map(Json::Value).collect();
    let mut app: Vec<Json> = app.into_iter().map(Json::Value).collect();
    // Istio's webhook moves the proxy first after any template.
    let hold_order = hold_pc || s.hold_values;
    if native {
        inits.insert(0, proxy);
    } else if hold_order {
        app.insert(0, proxy);
    } else {
        app.push(proxy);
    }

    // Labels.
    let mut new_labels = labels.clone();
    // grpc-agent leaves tlsMode to the app: only its own gRPC code knows whether it does mTLS.
    if template == Template::Sidecar {
        new_labels.insert(
            "security.istio.io/tlsMode".into(),
            json!(label("security.istio.io/tlsMode").unwrap_or("istio")),
        );
    }
    // Istio's CNI adds DNS rules (port 53 to the agent's 15053) for DNS capture; podwire-cni
    // does not, so the agent's DNS proxy would sit unused.
    if template == Template::Sidecar
        && metadata
            .get("ISTIO_META_DNS_CAPTURE")
            .and_then(|v| parse_bool(v))
            == Some(true)
    {
        warnings.push(
            "proxyMetadata ISTIO_META_DNS_CAPTURE is true, but podwire-cni does not redirect \
             DNS (port 53) to the proxy: the pod's DNS queries bypass Istio's DNS proxy"
                .to_string(),
        );
    }
    if metadata.get("ISTIO_META_ENABLE_HBONE").map(String::as_str) == Some("true")
        && template == Template::Sidecar
    {
        new_labels.insert(
            "networking.istio.io/tunnel".into(),
            json!(label("networking.istio.io/tunnel").unwrap_or("http")),
        );
    }
    let canonical = label("service.istio.io/canonical-name")
        .or_else(|| label("app.kubernetes.io/name"))
        .or_else(|| label("app"))
        .unwrap_or(&workload.name);
    new_labels.insert(
        "service.istio.io/canonical-name".into(),
        // Only the sidecar template trims it.
        json!(if template != Template::Sidecar {
            canonical.to_string()
        } else {
            trim_canonical(canonical)
        }),
    );
    new_labels.insert(
        "service.istio.io/canonical-revision".into(),
        json!(label("service.istio.io/canonical-revision")
            .or_else(|| label("app.kubernetes.io/version"))
            .or_else(|| label("version"))
            .unwrap_or("latest")),
    );
    if !network.is_empty() {
        new_labels.insert("topology.istio.io/network".into(), json!(network));
    }

    // Annotations.
    let rev = if s.revision.is_empty() {
        "default"
    } else {
        &s.revision
    };
    annotations.insert("istio.io/rev".into(), json!(rev));
    if let Some(first) = app_names.first() {
        for k in [
            "kubectl.kubernetes.io/default-logs-container",
            "kubectl.kubernetes.io/default-container",
        ] {
            if !a.contains_key(k) {
                annotations.insert(k.into(), json!(first));
            }
        }
    }
    if grpc {
        annotations.insert(
            "sidecar.istio.io/rewriteAppHTTPProbers".into(),
            json!("false"),
        );
    }
    // What the CNI plugin reads (Istio's istio-cni annotations; podwire-cni is the CNI).
    // A gateway or a proxyless pod is not redirected: their templates write none.
    if template.redirected() {
        // Said for the mode as rendered, wherever it came from (the pod's annotation, its
        // proxy.istio.io/config, the mesh's defaultConfig): the pod is admitted as Istio
        // admits it, but nothing will capture its traffic.
        if interception != "REDIRECT" {
            warnings.push(format!(
                "sidecar.istio.io/interceptionMode is {interception:?} ({}): podwire-cni only \
                 programs REDIRECT, so this pod's traffic will not reach the proxy",
                if ann(a, "sidecar.istio.io/interceptionMode").is_some() {
                    "from the pod's annotation"
                } else {
                    "from ProxyConfig: the pod's proxy.istio.io/config or the mesh's defaultConfig"
                }
            ));
        }
        let a_or = |k: &str, d: &str| ann(a, k).unwrap_or(d).to_string();
        annotations.insert(
            "sidecar.istio.io/interceptionMode".into(),
            json!(interception),
        );
        let inc_ranges = a_or(
            "traffic.sidecar.istio.io/includeOutboundIPRanges",
            &s.include_ip_ranges,
        );
        if !inc_ranges.is_empty() {
            annotations.insert(
                "traffic.sidecar.istio.io/includeOutboundIPRanges".into(),
                json!(inc_ranges),
            );
        }
        let exc_ranges = a_or(
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            &s.exclude_ip_ranges,
        );
        if !exc_ranges.is_empty() {
            annotations.insert(
                "traffic.sidecar.istio.io/excludeOutboundIPRanges".into(),
                json!(exc_ranges),
            );
        }
        annotations.insert(
            "traffic.sidecar.istio.io/includeInboundPorts".into(),
            json!(a_or(
                "traffic.sidecar.istio.io/includeInboundPorts",
                &s.include_inbound_ports
            )),
        );
        annotations.insert(
            "traffic.sidecar.istio.io/excludeInboundPorts".into(),
            json!(exclude_inbound_port(
                &status_port,
                &a_or(
                    "traffic.sidecar.istio.io/excludeInboundPorts",
                    &s.exclude_inbound_ports
                )
            )),
        );
        for (k, d) in [
            (
                "traffic.sidecar.istio.io/includeOutboundPorts",
                &s.include_outbound_ports,
            ),
            (
                "traffic.sidecar.istio.io/excludeOutboundPorts",
                &s.exclude_outbound_ports,
            ),
        ] {
            if a.contains_key(k) || !d.is_empty() {
                annotations.insert(k.into(), json!(a_or(k, d)));
            }
        }
    }
    // The containers the template wrote, in its order.
    let mut written = vec![o.name.as_str()];
    if grpc {
        written.extend(app_names.iter().map(String::as_str));
    }
    let (init_list, app_list): (&[&str], &[&str]) = if native {
        (&written, &[])
    } else {
        (&[], &written)
    };
    let volume_names: Vec<&str> = volumes.iter().map(|(n, _)| n.as_ref()).collect();
    let secret_names: Vec<&str> = s.image_pull_secrets.iter().map(String::as_str).collect();
    let status = status_string(init_list, app_list, &volume_names, &secret_names, rev);
    annotations.insert(STATUS.into(), Value::String(status));
    if let Some(ov) = overrides_annotation {
        annotations.insert(OVERRIDES.into(), json!(ov));
    }
    for (k, v) in s.injected_annotations.iter().chain(extra_annotations) {
        annotations.insert(k.clone(), json!(v));
    }

    // Volumes: the template's first (as Istio's strategic merge leaves them), then the pod's
    // own; a pod volume named like a template one is replaced by it.
    // (The first of the pod's volumes of one name is kept, nameless ones counting as "".)
    let mut own_volumes: Vec<Json> = Vec::new();
    let mut own_names: Vec<&str> = Vec::new();
    for v in spec
        .get("volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = name_of(v);
        if !volumes.iter().any(|(n, _)| n == name) && !own_names.contains(&name) {
            own_names.push(name);
            own_volumes.push(Json::Value(v.clone()));
        }
    }
    let pod_volumes: Vec<Json> = volumes
        .into_iter()
        .map(|(_, v)| v)
        .chain(own_volumes)
        .collect();
    // The values' secrets first, then the pod's own others (Istio's merge order).
    let mut secrets: Vec<Value> = s
        .image_pull_secrets
        .iter()
        .map(|n| json!({ "name": n }))
        .collect();
    for own in containers(spec, "imagePullSecrets") {
        if !secrets.iter().any(|x| name_of(x) == name_of(&own)) {
            secrets.push(own);
        }
    }

    let mut spec_fields = vec![("containers", Json::Array(app))];
    if gateway {
        // The gateway template's pod securityContext, merged over the pod's own.
        let mut sc = spec.get("securityContext").cloned().unwrap_or(json!({}));
        let theirs = s.gateway_security_context.clone().unwrap_or_else(
            || json!({"sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]}),
        );
        merge_over(&mut sc, &theirs);
        spec_fields.push(("securityContext", Json::Value(sc)));
    }
    if !inits.is_empty() || spec.get("initContainers").is_some() {
        spec_fields.push(("initContainers", Json::Array(inits)));
    }
    spec_fields.push(("volumes", Json::Array(pod_volumes)));
    if !secrets.is_empty() {
        spec_fields.push(("imagePullSecrets", Json::Value(Value::Array(secrets))));
    }
    Ok(Rendered {
        labels: new_labels,
        annotations,
        spec: spec_fields,
        warnings,
        native,
        template,
    })
}

/// Istio's status annotation: fields in Go's struct order, an empty list as `null`.
fn status_string(
    inits: &[&str],
    containers: &[&str],
    volumes: &[&str],
    secrets: &[&str],
    revision: &str,
) -> String {
    let mut out = String::with_capacity(256);
    for (i, (k, names)) in [
        ("initContainers", inits),
        ("containers", containers),
        ("volumes", volumes),
        ("imagePullSecrets", secrets),
    ]
    .into_iter()
    .enumerate()
    {
        out.push_str(if i == 0 { "{\"" } else { ",\"" });
        out.push_str(k);
        out.push_str("\":");
        if names.is_empty() {
            out.push_str("null");
        } else {
            out.push_str(&serde_json::to_string(names).unwrap_or_default());
        }
    }
    out.push_str(",\"revision\":");
    out.push_str(&serde_json::to_string(revision).unwrap_or_default());
    out.push('}');
    out
}

/// Append `e` to the proxy's env, replacing an entry of the same name.
fn push_env(proxy: &mut Json, e: Value) {
    let name = e
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    match proxy {
        Json::Object(c) => match c.get_mut("env") {
            Some(Json::Array(list)) => {
                list.retain(|x| x.str_member("name") != Some(name.as_str()));
                list.push(Json::Value(e));
            }
            Some(Json::Value(Value::Array(list))) => push_env_value(list, &name, e),
            _ => {}
        },
        Json::Value(c) => {
            if let Some(Value::Array(list)) = c.get_mut("env") {
                push_env_value(list, &name, e);
            }
        }
        Json::Raw(_) | Json::Array(_) => {}
    }
}

fn push_env_value(list: &mut Vec<Value>, name: &str, e: Value) {
    list.retain(|x| x.get("name").and_then(Value::as_str) != Some(name));
    list.push(e);
}

/// Prebuilt volumes, with their names, as a pod's.
fn shared(list: &[(String, Raw)]) -> impl Iterator<Item = (Cow<'_, str>, Json)> + '_ {
    list.iter()
        .map(|(n, r)| (Cow::Borrowed(n.as_str()), Json::Raw(r.clone())))
}

fn drop_zero(mut v: Value) -> Value {
    if let Value::Object(m) = &mut v {
        m.retain(|_, x| x.as_i64() != Some(0));
    }
    v
}

/// `sidecar.istio.io/userVolume` / `userVolumeMount`: a JSON map name → object.
fn user_map(a: &Map<String, Value>, key: &str) -> Result<Vec<(String, Value)>> {
    let Some(text) = ann(a, key) else {
        return Ok(Vec::new());
    };
    let parsed: Value =
        serde_json::from_str(text).map_err(|e| invalid(key, text, format!("not JSON: {e}")))?;
    let Value::Object(m) = parsed else {
        return Err(invalid(
            key,
            text,
            "expected a JSON object of name → object",
        ));
    };
    let mut out = Vec::new();
    for (name, v) in m {
        if !v.is_object() || name.is_empty() || name.len() > 63 {
            return Err(invalid(
                key,
                text,
                format!("entry {name:?} is not a named object"),
            ));
        }
        out.push((name, v));
    }
    Ok(out)
}

/// The proxy's resources: only the pod's `sidecar.istio.io/proxy*` annotations when any is
/// set (as Istio's template), else the values' `global.proxy.resources`.
fn proxy_resources(a: &Map<String, Value>, s: &Resolved) -> Result<Value> {
    let keys = [
        ("sidecar.istio.io/proxyCPU", "requests", "cpu"),
        ("sidecar.istio.io/proxyMemory", "requests", "memory"),
        ("sidecar.istio.io/proxyCPULimit", "limits", "cpu"),
        ("sidecar.istio.io/proxyMemoryLimit", "limits", "memory"),
    ];
    if !keys.iter().any(|(k, _, _)| a.contains_key(*k)) {
        return Ok(s.resources.clone().unwrap_or_else(|| json!({})));
    }
    let mut r = json!({});
    for (k, kind, res) in keys {
        if let Some(v) = ann(a, k) {
            Quantity::parse(v).map_err(|why| invalid(k, v, why))?;
            if r.get(kind).is_none() {
                r[kind] = json!({});
            }
            r[kind][res] = json!(v);
        }
    }
    for (res, req_key, lim_key) in [
        ("cpu", keys[0].0, keys[2].0),
        ("memory", keys[1].0, keys[3].0),
    ] {
        let q = |kind: &str| {
            member_at(&r, &[kind, res])
                .and_then(Value::as_str)
                .and_then(|t| Quantity::parse(t).ok())
        };
        if let (Some(req), Some(lim)) = (q("requests"), q("limits")) {
            if req.cmp_value(&lim).is_gt() {
                return Err(invalid(
                    req_key,
                    req.as_str(),
                    format!(
                        "more than the proxy's {res} limit {} (raise {lim_key} too)",
                        lim.as_str()
                    ),
                ));
            }
        }
    }
    Ok(r)
}

/// Istio's app-probe rewrite: every httpGet / tcpSocket / grpc probe (and httpGet / tcpSocket
/// lifecycle hook) of the app containers goes through the agent on the status port at
/// `/app-health/<container>/<readyz|livez|startupz>` (`/app-lifecycle/.../<prestopz|poststartz>`);
/// the original is returned for `ISTIO_KUBE_APP_PROBERS`.
pub fn rewrite_probes(
    inits: &mut [Value],
    app: &mut [Value],
    status_port: i64,
) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for c in inits.iter_mut().chain(app.iter_mut()) {
        const PROBES: [(&str, &str); 3] = [
            ("readinessProbe", "readyz"),
            ("livenessProbe", "livez"),
            ("startupProbe", "startupz"),
        ];
        const HOOKS: [(&str, &str); 2] = [("preStop", "prestopz"), ("postStart", "poststartz")];
        // Most containers have neither: nothing is built for them.
        let hooks = c.get("lifecycle").and_then(Value::as_object);
        if !PROBES.iter().any(|(f, _)| c.get(f).is_some())
            && !HOOKS
                .iter()
                .any(|(f, _)| hooks.is_some_and(|h| h.contains_key(*f)))
        {
            continue;
        }
        let name = name_of(c).to_string();
        let ports: BTreeMap<String, i64> = c
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    p.get("name")?.as_str()?.to_string(),
                    p.get("containerPort")?.as_i64()?,
                ))
            })
            .collect();
        for (field, path) in PROBES {
            let Some(probe) = c.get_mut(field) else {
                continue;
            };
            let url = format!("/app-health/{name}/{path}");
            if let Some(p) = prober(probe, &ports, status_port, true) {
                out.insert(url.clone(), p);
            }
            convert(probe, &url, status_port, true);
        }
        for (field, path) in HOOKS {
            let Some(h) = c.get_mut("lifecycle").and_then(|l| l.get_mut(field)) else {
                continue;
            };
            let url = format!("/app-lifecycle/{name}/{path}");
            if let Some(p) = prober(h, &ports, status_port, false) {
                out.insert(url.clone(), p);
            }
            convert(h, &url, status_port, false);
        }
    }
    out
}

fn prober(
    probe: &Value,
    ports: &BTreeMap<String, i64>,
    status_port: i64,
    grpc: bool,
) -> Option<Value> {
    let timeout = probe
        .get("timeoutSeconds")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let mut p = Map::new();
    if let (true, Some(g)) = (grpc, probe.get("grpc")) {
        p.insert("grpc".into(), g.clone());
    } else {
        let (kind, action) = if let Some(h) = probe.get("httpGet") {
            ("httpGet", h)
        } else if let Some(t) = probe.get("tcpSocket") {
            ("tcpSocket", t)
        } else {
            return None;
        };
        let mut action = action.clone();
        match action.get("port") {
            Some(Value::String(n)) => match n.parse::<i64>().ok().or_else(|| ports.get(n).copied())
            {
                Some(num) => action["port"] = json!(num),
                None => return None,
            },
            Some(Value::Number(n)) if n.as_i64() == Some(status_port) => return None,
            _ => {}
        }
        p.insert(kind.into(), action);
    }
    if grpc && timeout != 0 {
        p.insert("timeoutSeconds".into(), json!(timeout));
    }
    Some(Value::Object(p))
}

fn convert(probe: &mut Value, url: &str, status_port: i64, grpc: bool) {
    let Some(m) = probe.as_object_mut() else {
        return;
    };
    let mut action = if let Some(h) = m.get("httpGet") {
        h.clone()
    } else if m.contains_key("tcpSocket") || (grpc && m.contains_key("grpc")) {
        json!({})
    } else {
        return;
    };
    m.remove("tcpSocket");
    if grpc {
        m.remove("grpc");
    }
    action["port"] = json!(status_port);
    action["path"] = json!(url);
    if action.get("scheme").and_then(Value::as_str) == Some("HTTPS") {
        action["scheme"] = json!("HTTP");
    }
    m.insert("httpGet".into(), action);
}

/// The merged proxy as podwire-cni reads the pod (the first two args, the env it decides on;
/// [`crate::pod::Container`]'s deserializer), without building the whole container first.
fn read_as_plugin(proxy: &Json) -> crate::pod::Container {
    let c = Node::of(proxy);
    let strings = |key: &str| c.get(key).map(Node::items).unwrap_or_default();
    crate::pod::Container {
        name: c
            .get("name")
            .and_then(Node::as_str)
            .unwrap_or_default()
            .to_owned(),
        args: strings("args")
            .into_iter()
            .take(2)
            .map(|a| a.as_str().unwrap_or_default().to_owned())
            .collect(),
        env: strings("env")
            .into_iter()
            .filter_map(|e| {
                let name = e.get("name")?.as_str()?;
                crate::pod::READ_ENV
                    .contains(&name)
                    .then(|| crate::pod::EnvVar {
                        name: name.to_owned(),
                        value: e.get("value").and_then(Node::as_str).map(str::to_owned),
                    })
            })
            .collect(),
        restart_policy: c
            .get("restartPolicy")
            .and_then(Node::as_str)
            .map(str::to_owned),
        security_context: c.get("securityContext").and_then(|sc| {
            matches!(
                sc,
                Node::Value(Value::Object(_)) | Node::Json(Json::Object(_))
            )
            .then(|| crate::pod::SecurityContext {
                run_as_user: sc.get("runAsUser").and_then(Node::as_i64),
                run_as_group: sc.get("runAsGroup").and_then(Node::as_i64),
            })
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A scalar, a small object, or a list of objects keyed the ways `merge_over` merges.
    fn member() -> impl Strategy<Value = Value> {
        let scalar = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            (0u16..3).prop_map(Value::from),
            "[a-c]{0,2}".prop_map(Value::from),
        ];
        let item = (
            prop::option::of("[a-c]{1,2}"),
            prop::option::of(15090u16..15092),
            prop::option::of("/[a-c]{1,2}"),
            prop::option::of(scalar.clone()),
        )
            .prop_map(|(name, port, path, value)| {
                let mut m = Map::new();
                if let Some(n) = name {
                    m.insert("name".into(), json!(n));
                }
                if let Some(p) = port {
                    m.insert("containerPort".into(), json!(p));
                }
                if let Some(p) = path {
                    m.insert("mountPath".into(), json!(p));
                }
                if let Some(v) = value {
                    m.insert("value".into(), v);
                }
                Value::Object(m)
            });
        prop_oneof![
            scalar.clone(),
            prop::collection::vec(item, 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-c]", scalar, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    }

    fn container() -> impl Strategy<Value = Map<String, Value>> {
        let key = prop::sample::select(vec![
            "name",
            "image",
            "env",
            "ports",
            "volumeMounts",
            "securityContext",
            "args",
        ]);
        prop::collection::btree_map(key.prop_map(String::from), member(), 0..6)
            .prop_map(|m| m.into_iter().collect())
    }

    proptest! {
        /// The render's member-by-member merge over a container holding shared parts, and its
        /// env append, give exactly what `merge_over` and a plain append give on the whole
        /// container as a Value.
        #[test]
        fn merging_into_shared_parts_is_merging_the_whole(
            base in container(),
            raw_keys in prop::collection::vec(any::<bool>(), 7),
            overlays in prop::collection::vec(container(), 1..3),
            env_name in "[a-c]{1,2}",
        ) {
            let whole = Value::Object(base.clone());
            let mut json = Json::Object(
                base.iter()
                    .zip(raw_keys.iter().cycle())
                    .map(|((k, v), raw)| {
                        let part = match v {
                            // An env list as the render builds it: shared items and Values.
                            Value::Array(items) if k == "env" => Json::Array(
                                items.iter().map(|i| Json::Raw(Raw::new(i))).collect(),
                            ),
                            v if *raw => Json::Raw(Raw::new(v)),
                            v => Json::Value(v.clone()),
                        };
                        (k.clone(), part)
                    })
                    .collect(),
            );
            let mut want = whole;
            for o in &overlays {
                let o = Value::Object(o.clone());
                merge_into(&mut json, &o);
                merge_over(&mut want, &o);
            }
            let entry = json!({"name": env_name, "value": "x"});
            push_env(&mut json, entry.clone());
            if let Some(Value::Array(list)) = want.get_mut("env") {
                push_env_value(list, &env_name, entry);
            }
            prop_assert_eq!(json.to_value(), want);
        }
    }

    /// A well-typed proxy container as the merge leaves it: args and env of the kinds that
    /// make podwire-cni leave a pod alone, and unrelated members.
    fn proxy_container() -> impl Strategy<Value = Value> {
        let arg = prop::sample::select(vec!["proxy", "sidecar", "router", "--domain"]);
        let env = (
            prop::sample::select(vec![
                "DISABLE_ENVOY",
                "POD_NAME",
                "ENVOY_SECURE_MERGED_METRICS_PORT",
            ]),
            prop::option::of(prop::sample::select(vec!["true", "false", "", "15091"])),
        )
            .prop_map(|(name, value)| match value {
                Some(v) => json!({"name": name, "value": v}),
                None => json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": "x"}}}),
            });
        (
            prop::option::of(prop::collection::vec(arg, 0..4)),
            prop::option::of(prop::collection::vec(env, 0..4)),
            0u8..6,
        )
            .prop_map(|(args, env, sc)| {
                let mut c = json!({"name": "istio-proxy", "image": "auto"});
                if sc % 3 > 0 {
                    c["restartPolicy"] = json!("Always");
                    c["securityContext"] = if sc % 3 == 1 {
                        json!({"runAsUser": 1337, "runAsGroup": 1337, "privileged": false})
                    } else {
                        json!({"readOnlyRootFilesystem": true})
                    };
                }
                if let Some(a) = args {
                    c["args"] = json!(a);
                }
                if let Some(e) = env {
                    c["env"] = json!(e);
                }
                c
            })
    }

    proptest! {
        /// The borrowed read of the merged proxy is the plugin's own reading of the container,
        /// however its parts are held.
        #[test]
        fn the_proxy_is_read_as_the_plugin_reads_it(
            c in proxy_container(),
            raw in any::<bool>(),
        ) {
            let held = Json::Object(
                c.as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| {
                        let part = match v {
                            Value::Array(items) if k == "env" => Json::Array(
                                items.iter().map(|i| Json::Raw(Raw::new(i))).collect(),
                            ),
                            v if raw => Json::Raw(Raw::new(v)),
                            v => Json::Value(v.clone()),
                        };
                        (k.clone(), part)
                    })
                    .collect(),
            );
            let plugin: crate::pod::Container = serde_json::from_value(c).expect("container");
            prop_assert_eq!(read_as_plugin(&held), plugin);
        }
    }

    #[test]
    fn a_pod_bound_to_a_node_follows_that_nodes_kubelet() {
        let nodes = NodeSidecars::new([("new", "v1.33.1"), ("old", "v1.32.0"), ("odd", "x")]);
        assert!(nodes.native_on("new"));
        assert!(!nodes.native_on("old"));
        assert!(!nodes.native_on("odd"), "unreadable: classic");
        assert!(!nodes.native_on(""), "not scheduled: every node decides");
        assert!(
            !nodes.native_on("unseen"),
            "unknown node: every node decides"
        );
        let all_new = NodeSidecars::new([("new", "v1.33.1"), ("newer", "v1.35.0")]);
        assert!(all_new.native_on("") && all_new.native_on("unseen") && all_new.native_on("new"));
        assert_eq!(all_new.for_any_node(), &Ok(2));
        let none = NodeSidecars::new([]);
        assert!(
            !none.native_on("") && !none.native_on("a"),
            "no node: classic"
        );
    }

    #[test]
    fn native_sidecars_need_every_kubelet_at_1_33() {
        let ok = kubelets_run_native_sidecars([("a", "v1.33.0"), ("b", "v1.34.2-eks-3f1c")]);
        assert_eq!(ok, Ok(2));
        let old = kubelets_run_native_sidecars([("a", "v1.33.0"), ("b", "v1.32.9")]);
        assert!(old.is_err_and(|e| e.contains("node b") && e.contains("v1.32.9")));
        let odd = kubelets_run_native_sidecars([("a", "v1.33.0"), ("c", "unknown")]);
        assert!(odd.is_err_and(|e| e.contains("node c")));
        assert!(kubelets_run_native_sidecars([("d", "v2.0.0")]).is_err());
        assert!(kubelets_run_native_sidecars([]).is_err());
        // Read as istiod's go-version reads them.
        for (v, minor) in [
            ("v1.33.0-gke.1200", Some(33)),
            ("1.33", Some(33)),
            ("v1.33+meta", Some(33)),
            ("1.33rc1", Some(33)),
            ("1-33", Some(0)),
            ("1+33", Some(0)),
            ("1", Some(0)),
            ("vv1.33", None),
            (" v1.33.0", None),
            ("v1.33.", None),
            ("", None),
        ] {
            assert_eq!(kubelet_minor(v), minor, "{v:?}");
        }
    }

    #[test]
    fn exclude_inbound_port_adds_the_status_port_once() {
        assert_eq!(exclude_inbound_port("15020", ""), "15020");
        assert_eq!(exclude_inbound_port("15020", "4,5"), "4,5,15020");
        assert_eq!(exclude_inbound_port("15020", "15020"), "15020");
        assert_eq!(exclude_inbound_port("0", "4"), "4");
    }

    #[test]
    fn workload_from_a_replicaset_pod_is_its_deployment() {
        let pod = json!({"metadata": {"generateName": "web-5d8f-", "namespace": "shop",
            "labels": {"pod-template-hash": "5d8f"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d8f", "controller": true}]}});
        let w = Workload::from_pod(&pod);
        assert_eq!((w.kind.as_str(), w.name.as_str()), ("Deployment", "web"));
        let job = json!({"metadata": {"generateName": "nightly-28391230-",
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "nightly-28391230", "controller": true}]}});
        assert_eq!(Workload::from_pod(&job).kind, "CronJob");
        let bare = json!({"metadata": {"name": "p"}});
        assert_eq!(Workload::from_pod(&bare).kind, "Pod");
    }

    #[test]
    fn clean_proxy_config_drops_defaults_only() {
        let pc = json!({"discoveryAddress": "istiod.istio-system.svc:15012", "concurrency": 0, "drainDuration": "23s"});
        assert_eq!(
            clean_proxy_config(&pc),
            json!({"concurrency": 0, "drainDuration": "23s"})
        );
    }

    #[test]
    fn settings_of_the_wrong_type_are_named() {
        let values = json!({"global": {"proxy": {"statusPort": "x"}}});
        let err = IstioSettings {
            values: &values,
            mesh: &Value::Null,
        }
        .resolve()
        .expect_err("bad");
        assert!(
            err.to_string().contains("values.global.proxy.statusPort"),
            "{err}"
        );
        let none = IstioSettings {
            values: &Value::Null,
            mesh: &Value::Null,
        }
        .resolve()
        .expect("defaults");
        assert_eq!(
            none.resources.expect("chart default")["limits"]["cpu"],
            "2000m"
        );
        let null = json!({"global": {"proxy": {"resources": null}}});
        let r = IstioSettings {
            values: &null,
            mesh: &Value::Null,
        }
        .resolve()
        .expect("null");
        assert_eq!(r.resources, None, "resources: null means none, as Istio");
        let values = json!({"global": {"hub": "a b"}});
        assert!(IstioSettings {
            values: &values,
            mesh: &Value::Null
        }
        .resolve()
        .is_err());
    }
}
