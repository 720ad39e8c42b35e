//! The checks, one per cause in the troubleshooting documents (Istio's "Sidecar Injection
//! Problems" and the service-mesh injection guide), in their order. Each is a pure function
//! of what was read, so the report never depends on the order things were fetched in.

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

/// (status, evidence lines, fix)
type Outcome = (Status, Vec<String>, Option<String>);

fn pass(evidence: Vec<String>) -> Outcome {
    (Status::Pass, evidence, None)
}

fn fail(evidence: Vec<String>, fix: impl Into<String>) -> Outcome {
    (Status::Fail, evidence, Some(fix.into()))
}

fn unknown(why: impl Into<String>) -> Outcome {
    (
        Status::Unknown,
        vec![format!("could not check: {}", why.into())],
        None,
    )
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
        .map(|(id, title, (status, evidence, fix))| Check {
            id,
            title,
            status,
            evidence: evidence.join("\n"),
            fix,
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

// 1 ------------------------------------------------------------------------------------------

fn system_namespace(inp: &Inputs, cfg: &Config) -> Outcome {
    let ns = inp.namespace;
    if SYSTEM_NAMESPACES.contains(&ns) {
        return fail(
            vec![format!(
                "namespace {ns} is never injected: system pods ({}) must start even when the mesh is broken",
                SYSTEM_NAMESPACES.join(", ")
            )],
            format!("run the workload in an application namespace; sidecars cannot be injected into {ns}"),
        );
    }
    let c = match cfg {
        Ok(c) => &c.config,
        Err((_, why)) => return unknown(format!("ignoredNamespaces: {why}")),
    };
    match c.ignored_namespace(ns) {
        Some(why) => fail(
            vec![format!(
                "namespace {ns} {why}: ignoredNamespaces {:?} in configmap {SYSTEM_NS}/{INJECTOR}",
                c.ignored_namespaces
            )],
            format!(
                "remove {ns} from ignoredNamespaces: kubectl -n {SYSTEM_NS} edit configmap {INJECTOR}; then {RESTART_INJECTOR}"
            ),
        ),
        None => pass(vec![format!(
            "namespace {ns} is not a system namespace and not in ignoredNamespaces {:?}",
            c.ignored_namespaces
        )]),
    }
}

// 2 ------------------------------------------------------------------------------------------

fn host_network(inp: &Inputs) -> Outcome {
    let s = match subject(inp) {
        Ok(s) => s,
        Err(e) => return unknown(e),
    };
    if s.pod.pointer("/spec/hostNetwork") == Some(&Value::Bool(true)) {
        fail(
            vec![format!(
                "{} has hostNetwork: true: pods on the host network are never injected (the \
                 redirection would be programmed in the node's network namespace)",
                s.source
            )],
            "remove hostNetwork: true from the pod spec if the pod should be in the mesh",
        )
    } else {
        pass(vec![format!("{} does not use hostNetwork", s.source)])
    }
}

// 3 ------------------------------------------------------------------------------------------

fn webhooks<'a>(inp: &Inputs<'a>) -> Result<&'a Vec<MutatingWebhook>, String> {
    let wc = inp.cluster.webhook.as_ref().map_err(Clone::clone)?;
    match &wc.webhooks {
        Some(w) if !w.is_empty() => Ok(w),
        _ => Err(format!(
            "mutatingwebhookconfiguration {WEBHOOK_CONFIG} has no webhooks"
        )),
    }
}

fn core_selector(w: &MutatingWebhook) -> Result<LabelSelector, String> {
    match &w.namespace_selector {
        None => Ok(LabelSelector::default()),
        Some(sel) => serde_json::to_value(sel)
            .and_then(serde_json::from_value)
            .map_err(|e| format!("webhook {}: namespaceSelector: {e}", w.name)),
    }
}

/// Labels that make `sel` match, as `kubectl label` arguments (`k=v` or `k-`).
fn relabel(sel: &LabelSelector, labels: &Labels, profile: &MeshProfile) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in &sel.match_labels {
        if labels.get(k) != Some(v) {
            out.push(format!("{k}={v}"));
        }
    }
    for r in &sel.match_expressions {
        if r.matches(labels) {
            continue;
        }
        let Requirement {
            key,
            operator,
            values,
        } = r;
        out.push(match operator {
            Operator::In => format!("{key}={}", values.first().map_or("", String::as_str)),
            // The mesh's own label reads best as "enabled" (the seed's opt-out fix).
            Operator::NotIn
                if key == profile.namespace_label && !values.iter().any(|v| v == "enabled") =>
            {
                format!("{key}=enabled")
            }
            Operator::NotIn | Operator::DoesNotExist => format!("{key}-"),
            Operator::Exists => format!("{key}=enabled"),
        });
    }
    out
}

fn mode(sel: &LabelSelector) -> &'static str {
    let opt_out = sel.match_labels.is_empty()
        && !sel.match_expressions.is_empty()
        && sel
            .match_expressions
            .iter()
            .all(|r| matches!(r.operator, Operator::NotIn | Operator::DoesNotExist));
    if sel.is_empty() {
        "every namespace"
    } else if opt_out {
        "opt-out"
    } else {
        "opt-in"
    }
}

fn namespace_selector(inp: &Inputs) -> Outcome {
    let ns = inp.namespace;
    let hooks = match webhooks(inp) {
        Ok(h) => h,
        Err(e) => return unknown(e),
    };
    let namespace = match &inp.cluster.namespace {
        Ok(n) => n,
        Err(e) => return unknown(e.clone()),
    };
    let labels: Labels = namespace.metadata.labels.clone().unwrap_or_default();
    let shown = if labels.is_empty() {
        "no labels".to_string()
    } else {
        labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut evidence = vec![format!("namespace {ns} has {shown}")];
    let mut fixes = Vec::new();
    for w in hooks {
        let sel = match core_selector(w) {
            Ok(s) => s,
            Err(e) => return unknown(e),
        };
        let selected = sel.matches(&labels);
        evidence.push(format!(
            "webhook {} namespaceSelector: {sel} ({}): {}",
            w.name,
            mode(&sel),
            if selected {
                "selects it"
            } else {
                "does NOT select it: the API server never calls the injector for its pods, even with inject: \"true\""
            }
        ));
        if !selected {
            let args = relabel(&sel, &labels, inp.profile);
            fixes.push(format!(
                "kubectl label namespace {ns} {} --overwrite",
                args.join(" ")
            ));
        }
    }
    if fixes.is_empty() {
        pass(evidence)
    } else {
        fixes.dedup();
        fail(evidence, fixes.join("\n"))
    }
}

// 4 ------------------------------------------------------------------------------------------

fn default_policy(inp: &Inputs, cfg: &Config) -> Outcome {
    let loaded = match cfg {
        Ok(c) => c,
        Err((false, why)) => return unknown(why.clone()),
        Err((true, why)) => {
            return fail(
                vec![format!("the injector refuses its config: {why}")],
                format!("fix data[config.yaml]: kubectl -n {SYSTEM_NS} edit configmap {INJECTOR}; then {RESTART_INJECTOR}"),
            )
        }
    };
    let c = &loaded.config;
    let edit = format!(
        "set `policy: enabled` (or `disabled`) in data[config.yaml]: kubectl -n {SYSTEM_NS} edit configmap {INJECTOR}; then {RESTART_INJECTOR}"
    );
    let mut evidence = vec![format!("policy: {}", c.policy)];
    evidence.extend(loaded.warnings.iter().map(|w| format!("warning: {w}")));
    match &c.policy {
        Policy::Unrecognized(p) => fail(
            {
                evidence.push(format!(
                    "{p:?} is not a policy (enabled|disabled): default injection is disabled completely"
                ));
                evidence
            },
            edit,
        ),
        Policy::Enabled => pass(evidence),
        Policy::Disabled => {
            // Disabled is a choice; it is this pod's problem only when nothing else asks for
            // the proxy.
            let Ok(Some(s)) = inp.subject else {
                evidence.push(
                    "only pods asking for it (inject: \"true\", alwaysInjectSelector) are injected"
                        .into(),
                );
                return pass(evidence);
            };
            match read_pod(&s.pod) {
                Ok(info) => {
                    let d = decide(&info, None, c, inp.profile);
                    if d.step == Step::Policy && !d.inject {
                        evidence.push(format!("{}: {}", s.source, d.reason));
                        fail(
                            evidence,
                            format!(
                                "annotate the pod template with {}: \"true\", or {edit}",
                                inp.profile.inject_key
                            ),
                        )
                    } else {
                        evidence.push(format!("{}: {}", s.source, d.reason));
                        pass(evidence)
                    }
                }
                Err(e) => unknown(format!("{}: {e}", s.source)),
            }
        }
    }
}

// 5 ------------------------------------------------------------------------------------------

fn meta_value<'a>(meta: &'a Value, section: &str, key: &str) -> Option<&'a str> {
    meta.get(section)?.get(key)?.as_str()
}

fn pod_annotation(inp: &Inputs) -> Outcome {
    let s = match subject(inp) {
        Ok(s) => s,
        Err(e) => return unknown(e),
    };
    let key = inp.profile.inject_key;
    let info = match read_pod(&s.pod) {
        Ok(i) => i,
        Err(e) => return unknown(format!("{}: {e}", s.source)),
    };
    let (label, annotation) = (info.label(key), info.annotation(key));
    let own = s.workload_meta.as_ref().and_then(|m| {
        meta_value(m, "annotations", key)
            .map(|v| ("annotation", v))
            .or_else(|| meta_value(m, "labels", key).map(|v| ("label", v)))
    });
    let mut evidence = Vec::new();
    if let Some((what, v)) = own {
        evidence.push(format!(
            "{} {} has {what} {key}={v:?} on its own metadata",
            s.kind, s.name
        ));
    }
    let effective = match (label, annotation) {
        (Some(l), _) => Some(("label", l)),
        (None, Some(a)) => Some(("annotation", a)),
        (None, None) => None,
    };
    if let (Some(l), Some(a)) = (label, annotation) {
        if l != a {
            evidence.push(format!(
                "the pod's label {key}={l:?} overrides its annotation {key}={a:?} (the label wins)"
            ));
        }
    }
    let template = if s.kind == "Pod" {
        "the pod"
    } else {
        "spec.template.metadata"
    };
    match (effective, own) {
        (None, Some((_, v))) => {
            evidence.push(format!(
                "{template} has no {key}: the {}'s metadata is ignored, only the pod template's counts",
                s.kind.to_lowercase()
            ));
            fail(
                evidence,
                format!(
                    "move it to the pod template: kubectl -n {} patch {} {} --type=merge -p '{{\"spec\":{{\"template\":{{\"metadata\":{{\"annotations\":{{\"{key}\":\"{v}\"}}}}}}}}}}'",
                    inp.namespace,
                    s.kind.to_lowercase(),
                    s.name
                ),
            )
        }
        (None, None) => {
            evidence.push(format!(
                "no {key} on {template}: the namespace selector and the default policy decide"
            ));
            pass(evidence)
        }
        (Some((what, "true")), _) => {
            evidence.push(format!(
                "{template} has {what} {key}=\"true\": the proxy is forced in"
            ));
            pass(evidence)
        }
        (Some((what, "false")), _) => {
            evidence.push(format!(
                "{template} has {what} {key}=\"false\": the proxy is never injected into this pod"
            ));
            fail(
                evidence,
                format!("if the pod should be in the mesh, remove {key} from {template} (or set it to \"true\") and recreate the pod"),
            )
        }
        (Some((what, v)), _) => {
            evidence.push(format!(
                "{template} has {what} {key}={v:?}: only \"true\" and \"false\" count, this value is ignored"
            ));
            fail(
                evidence,
                format!("set {key} on {template} to \"true\" or \"false\" (quoted in YAML)"),
            )
        }
    }
}

// 6 ------------------------------------------------------------------------------------------

fn served_chain(inp: &Inputs) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, Outcome> {
    let secret = inp
        .cluster
        .secret
        .as_ref()
        .map_err(|e| unknown(e.clone()))?;
    let fix = format!(
        "the injector's leader writes {SYSTEM_NS}/{INJECTOR_SECRET}: check it runs (kubectl -n {SYSTEM_NS} logs deploy/{INJECTOR}); then {RESTART_INJECTOR}"
    );
    let Some(pem) = secret.data.as_ref().and_then(|d| d.get("tls.crt")) else {
        return Err(fail(
            vec![format!(
                "secret {SYSTEM_NS}/{INJECTOR_SECRET} has no tls.crt"
            )],
            fix,
        ));
    };
    certs::pem_certs(
        &pem.0,
        &format!("secret {SYSTEM_NS}/{INJECTOR_SECRET} tls.crt"),
    )
    .map_err(|e| fail(vec![e], fix))
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

fn ca_bundle(inp: &Inputs) -> Outcome {
    let hooks = match webhooks(inp) {
        Ok(h) => h,
        Err(e) => return unknown(e),
    };
    let chain = match served_chain(inp) {
        Ok(c) => c,
        Err(o) => return o,
    };
    let mut evidence = Vec::new();
    if let Some(leaf) = chain.first() {
        match certs::info(leaf) {
            Ok(i) => evidence.push(format!(
                "served certificate ({INJECTOR_SECRET} tls.crt): subject {}, issued by {}",
                i.subject, i.issuer
            )),
            Err(e) => evidence.push(format!("served certificate: {e}")),
        }
    }
    let mut failed = false;
    for w in hooks {
        let host = webhook_host(w);
        let bundle = w
            .client_config
            .ca_bundle
            .as_ref()
            .map(|b| b.0.clone())
            .unwrap_or_default();
        if bundle.is_empty() {
            failed = true;
            evidence.push(format!(
                "webhook {}: caBundle is empty: the API server cannot verify the injector (x509: certificate signed by unknown authority)",
                w.name
            ));
            continue;
        }
        let roots = match certs::pem_certs(&bundle, &format!("webhook {} caBundle", w.name)) {
            Ok(r) => r,
            Err(e) => {
                failed = true;
                evidence.push(e);
                continue;
            }
        };
        let subjects: Vec<String> = roots
            .iter()
            .filter_map(|r| certs::info(r).ok().map(|i| i.subject))
            .collect();
        match certs::verify(&chain, &roots, &host, inp.now) {
            Ok(Trust::Trusted) => evidence.push(format!(
                "webhook {}: the caBundle ({}) verifies the served certificate for {host}",
                w.name,
                subjects.join("; ")
            )),
            Ok(Trust::TrustedOutsideValidity(why)) => evidence.push(format!(
                "webhook {}: the caBundle ({}) signs the served certificate for {host} ({why}: see cert-expiry)",
                w.name,
                subjects.join("; ")
            )),
            Ok(Trust::Refused(why)) => {
                failed = true;
                evidence.push(format!(
                    "webhook {}: the caBundle ({}) does NOT verify the served certificate for {host}: {why} (the API server reports \"x509: certificate signed by unknown authority\")",
                    w.name,
                    subjects.join("; ")
                ));
            }
            Err(e) => return unknown(e),
        }
    }
    if failed {
        fail(
            evidence,
            format!(
                "the injector keeps the caBundle in step with its Secret's ca.crt; restart it so it re-syncs: {RESTART_INJECTOR}\n\
                 compare by hand: kubectl get mutatingwebhookconfiguration {WEBHOOK_CONFIG} -o jsonpath='{{.webhooks[0].clientConfig.caBundle}}' | base64 -d | md5sum; \
                 kubectl -n {SYSTEM_NS} get secret {INJECTOR_SECRET} -o jsonpath='{{.data.ca\\.crt}}' | base64 -d | md5sum"
            ),
        )
    } else {
        pass(evidence)
    }
}

// 7 ------------------------------------------------------------------------------------------

fn injector_endpoints(inp: &Inputs) -> Outcome {
    let c = inp.cluster;
    let mut evidence = Vec::new();
    let mut ready = 0usize;
    let mut errors = Vec::new();
    match &c.endpoints {
        Ok(ep) => {
            let subsets = ep.subsets.iter().flatten();
            let (r, nr) = subsets.fold((0, 0), |(r, nr), s| {
                (
                    r + s.addresses.as_ref().map_or(0, Vec::len),
                    nr + s.not_ready_addresses.as_ref().map_or(0, Vec::len),
                )
            });
            evidence.push(format!(
                "endpoints {SYSTEM_NS}/{INJECTOR}: {r} ready, {nr} not ready"
            ));
            ready += r;
        }
        Err(e) if e.contains(" 404 ") => {
            evidence.push(format!("endpoints {SYSTEM_NS}/{INJECTOR}: none (404)"))
        }
        Err(e) => errors.push(e.clone()),
    }
    match &c.endpoint_slices {
        Ok(slices) => {
            let all = slices.iter().flat_map(|s| s.endpoints.iter());
            // Kubernetes reads a missing `ready` as ready.
            let (r, nr) = all.fold((0, 0), |(r, nr), e| {
                if e.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                    (r, nr + 1)
                } else {
                    (r + 1, nr)
                }
            });
            evidence.push(format!(
                "endpointslices of service {INJECTOR}: {} slice(s), {r} ready, {nr} not ready",
                slices.len()
            ));
            ready += r;
        }
        Err(e) => errors.push(e.clone()),
    }
    if ready > 0 {
        return pass(evidence);
    }
    if errors.len() == 2 {
        return unknown(errors.join("; "));
    }
    evidence.extend(errors.into_iter().map(|e| format!("could not read: {e}")));
    evidence.push(format!(
        "pod creation fails with \"no endpoints available for service {INJECTOR}\" while the webhook's failurePolicy is Fail"
    ));
    let sel = "app.kubernetes.io/name=podwire-injector";
    fail(
        evidence,
        format!(
            "find out why the injector pods are not ready: kubectl -n {SYSTEM_NS} get pods -l {sel}; \
             kubectl -n {SYSTEM_NS} logs -l {sel}; kubectl -n {SYSTEM_NS} describe pods -l {sel}"
        ),
    )
}

// 8 ------------------------------------------------------------------------------------------

const MIN_VALIDITY_SECS: i64 = 7 * 86_400;

fn cert_expiry(inp: &Inputs) -> Outcome {
    let chain = match served_chain(inp) {
        Ok(c) => c,
        Err(o) => return o,
    };
    let mut evidence = Vec::new();
    let mut bad = false;
    for (i, der) in chain.iter().enumerate() {
        let what = if i == 0 {
            "served certificate".to_string()
        } else {
            format!("chain certificate {i}")
        };
        let info = match certs::info(der) {
            Ok(x) => x,
            Err(e) => return unknown(format!("{what}: {e}")),
        };
        let left = info.not_after - inp.now;
        let line = if info.not_before > inp.now {
            bad = true;
            format!(
                "{what} ({}) is not valid before {} (in {}): clocks disagree?",
                info.subject,
                certs::date(info.not_before),
                certs::span(info.not_before - inp.now)
            )
        } else if left <= 0 {
            bad = true;
            format!(
                "{what} ({}) EXPIRED at {} ({} ago): the API server refuses it",
                info.subject,
                certs::date(info.not_after),
                certs::span(left)
            )
        } else if left < MIN_VALIDITY_SECS {
            bad = true;
            format!(
                "{what} ({}) expires at {}, in {}: the injector renews at 2/3 of the validity, so renewal is overdue",
                info.subject,
                certs::date(info.not_after),
                certs::span(left)
            )
        } else {
            format!(
                "{what} ({}) valid until {} (in {})",
                info.subject,
                certs::date(info.not_after),
                certs::span(left)
            )
        };
        evidence.push(line);
    }
    if bad {
        fail(
            evidence,
            format!(
                "the injector's leader renews the certificate: check it runs and may write the Secret (see the rbac check; kubectl -n {SYSTEM_NS} logs deploy/{INJECTOR}); \
                 to force a new one: kubectl -n {SYSTEM_NS} delete secret {INJECTOR_SECRET} && {RESTART_INJECTOR}"
            ),
        )
    } else {
        pass(evidence)
    }
}

// 9 ------------------------------------------------------------------------------------------

/// Kubernetes' default; podwire answers in milliseconds, so a longer wait only stalls pod
/// creation when the injector is unreachable.
const MAX_TIMEOUT: i32 = 10;

fn failure_policy(inp: &Inputs) -> Outcome {
    let hooks = match webhooks(inp) {
        Ok(h) => h,
        Err(e) => return unknown(e),
    };
    let mut evidence = Vec::new();
    let mut ops = Vec::new();
    for (i, w) in hooks.iter().enumerate() {
        let fp = w.failure_policy.as_deref().unwrap_or("Fail");
        match w.failure_policy.as_deref() {
            Some("Ignore") => {
                evidence.push(format!(
                    "webhook {}: failurePolicy Ignore: when the injector is down, slow or untrusted, pods silently start WITHOUT a proxy (and without redirection), and nothing reports it",
                    w.name
                ));
                ops.push(format!(
                    "{{\"op\":\"replace\",\"path\":\"/webhooks/{i}/failurePolicy\",\"value\":\"Fail\"}}"
                ));
            }
            None => evidence.push(format!(
                "webhook {}: failurePolicy not set: the API server uses Fail (pods are refused while the injector cannot answer)",
                w.name
            )),
            Some(_) => evidence.push(format!(
                "webhook {}: failurePolicy {fp}: pods are refused while the injector cannot answer, never started without the proxy",
                w.name
            )),
        }
        match w.timeout_seconds {
            Some(t) if t > MAX_TIMEOUT => {
                evidence.push(format!(
                    "webhook {}: timeoutSeconds {t}: while the injector does not answer, every pod creation in selected namespaces waits {t}s before failing (controllers back off, rollouts stall); the injector answers in milliseconds, so {MAX_TIMEOUT}s is plenty",
                    w.name
                ));
                ops.push(format!(
                    "{{\"op\":\"replace\",\"path\":\"/webhooks/{i}/timeoutSeconds\",\"value\":{MAX_TIMEOUT}}}"
                ));
            }
            Some(t) => evidence.push(format!("webhook {}: timeoutSeconds {t}", w.name)),
            None => evidence.push(format!(
                "webhook {}: timeoutSeconds not set: the API server uses {MAX_TIMEOUT}s",
                w.name
            )),
        }
    }
    if ops.is_empty() {
        pass(evidence)
    } else {
        fail(
            evidence,
            format!(
                "kubectl patch mutatingwebhookconfiguration {WEBHOOK_CONFIG} --type=json -p='[{}]'",
                ops.join(",")
            ),
        )
    }
}

// 10 -----------------------------------------------------------------------------------------

/// Does a Go HTTP client (the API server's) skip the proxy for `host` with this NO_PROXY?
/// golang.org/x/net/http/httpproxy: `*` matches all; `foo.svc` matches it and its
/// subdomains; `.svc` and `*.svc` match subdomains only. IPs and CIDRs cannot match a name.
fn bypasses(no_proxy: &str, host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    no_proxy.split(',').any(|entry| {
        let e = entry.trim().to_ascii_lowercase();
        if e == "*" {
            return true;
        }
        // A port in the entry limits it to that port; the webhook is called on 443.
        let e = match e.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.contains(':') => {
                if p != "443" {
                    return false;
                }
                h.to_string()
            }
            _ => e,
        };
        if e.is_empty() {
            return false;
        }
        let e = e.strip_prefix('*').unwrap_or(&e).to_string();
        if let Some(domain) = e.strip_prefix('.') {
            host.ends_with(&format!(".{domain}"))
        } else {
            host == e || host.ends_with(&format!(".{e}"))
        }
    })
}

fn apiserver_proxy(inp: &Inputs) -> Outcome {
    let pods = match &inp.cluster.apiservers {
        Ok(p) => p,
        Err(e) => return unknown(e.clone()),
    };
    if pods.is_empty() {
        return unknown(
            "no pod labelled component=kube-apiserver in kube-system (a managed control plane?): \
             check the API server's HTTP(S)_PROXY / NO_PROXY with your provider",
        );
    }
    let host = webhooks(inp)
        .ok()
        .and_then(|h| h.first().map(webhook_host))
        .unwrap_or_else(|| format!("{INJECTOR}.{SYSTEM_NS}.svc"));
    let mut evidence = Vec::new();
    let mut bad = false;
    for pod in pods {
        let pname = pod.metadata.name.as_deref().unwrap_or("?");
        for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
            let env: BTreeMap<&str, &str> = c
                .env
                .iter()
                .flatten()
                .filter_map(|e| e.value.as_deref().map(|v| (e.name.as_str(), v)))
                .filter(|(_, v)| !v.is_empty())
                .collect();
            // Go reads the upper-case name first, then the lower-case one.
            let any = |names: [&str; 2]| names.iter().find_map(|n| env.get(n).copied());
            let https = any(["HTTPS_PROXY", "https_proxy"]);
            let http = any(["HTTP_PROXY", "http_proxy"]);
            let no_proxy = any(["NO_PROXY", "no_proxy"]).unwrap_or("");
            let Some(proxy) = https.or(http) else {
                evidence.push(format!("{pname}/{}: no proxy settings", c.name));
                continue;
            };
            if bypasses(no_proxy, &host) {
                evidence.push(format!(
                    "{pname}/{}: proxy {proxy}, but NO_PROXY {no_proxy:?} exempts {host}",
                    c.name
                ));
            } else {
                bad = true;
                evidence.push(format!(
                    "{pname}/{}: proxy {proxy} and NO_PROXY {no_proxy:?} does not exempt {host}: the API server sends the webhook call to the proxy (\"Service Unavailable\" in its log)",
                    c.name
                ));
            }
        }
    }
    if bad {
        fail(
            evidence,
            format!(
                "add .svc (or {host}) to both NO_PROXY and no_proxy of kube-apiserver in /etc/kubernetes/manifests/kube-apiserver.yaml on every control-plane node (the kubelet restarts it), or remove the proxy settings"
            ),
        )
    } else {
        pass(evidence)
    }
}

// 11 -----------------------------------------------------------------------------------------

fn node_agent(inp: &Inputs) -> Outcome {
    let nodes = match &inp.cluster.nodes {
        Ok(n) => n,
        Err(e) => return unknown(e.clone()),
    };
    if nodes.is_empty() {
        return unknown("no node known (the pod is not scheduled and no Node could be listed)");
    }
    let scope = match inp.subject {
        Ok(Some(Subject { node: Some(n), .. })) => format!("the pod's node {n}"),
        _ => format!("all {} node(s) (the pod has no node yet)", nodes.len()),
    };
    let mut evidence = vec![format!("checked {scope}")];
    let mut bad = Vec::new();
    for n in nodes {
        let name = n.metadata.name.as_deref().unwrap_or("?");
        let cond = n
            .status
            .iter()
            .flat_map(|s| s.conditions.iter().flatten())
            .find(|c| c.type_ == CONDITION);
        match cond {
            Some(c) if c.status == "True" => evidence.push(format!(
                "node {name}: {CONDITION} True ({})",
                c.message.as_deref().unwrap_or("")
            )),
            Some(c) => {
                bad.push(name.to_string());
                evidence.push(format!(
                    "node {name}: {CONDITION} {}: {}",
                    c.status,
                    c.message.as_deref().unwrap_or("(no message)")
                ));
            }
            None => {
                bad.push(name.to_string());
                evidence.push(format!(
                    "node {name}: no {CONDITION} condition: podwire-agent has never reported on it (not scheduled there?)"
                ));
            }
        }
    }
    if bad.is_empty() {
        return pass(evidence);
    }
    let sel = "app.kubernetes.io/name=podwire-agent";
    let fix = bad
        .iter()
        .map(|n| {
            format!(
                "node {n}: kubectl -n {SYSTEM_NS} get pods -l {sel} -o wide --field-selector spec.nodeName={n}; kubectl -n {SYSTEM_NS} logs -l {sel} --field-selector spec.nodeName={n} (not chained: the primary CNI config is missing or unwritable)"
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    fail(evidence, fix)
}

// 12 -----------------------------------------------------------------------------------------

/// A quantity's value. The grammar is core's ([`Quantity::parse`] decides what is valid);
/// this only scales the digits by the suffix, until core exposes the value it computes.
fn amount(s: &str) -> Option<f64> {
    Quantity::parse(s).ok().map(|q| q.value())
}

/// The proxy container as it would be injected into the subject (its resources follow the
/// pod's `sidecar.istio.io/proxy*` annotations), else as the config's template makes it.
fn injected(inp: &Inputs, cfg: &InjectorConfig) -> Result<(Value, Option<String>), String> {
    let (mut pod, note) = match inp.subject {
        Ok(Some(s)) => {
            let p = plan(&s.pod, Some(inp.namespace), None, cfg, inp.profile)
                .map_err(|e| format!("{}: {e}", s.source))?;
            if p.decision.inject {
                let ops = p
                    .patch
                    .map_err(|e| format!("{}: injection refused: {e}", s.source))?;
                let mut pod = s.pod.clone();
                apply_patch(&mut pod, &ops).map_err(|e| format!("{}: {e}", s.source))?;
                (pod, None)
            } else {
                (
                    s.pod.clone(),
                    Some(format!(
                        "{} would not be injected ({})",
                        s.source, p.decision.reason
                    )),
                )
            }
        }
        _ => {
            // No pod: the proxy alone, as the template makes it.
            let empty =
                json!({"metadata": {"namespace": inp.namespace}, "spec": {"containers": []}});
            let info = read_pod(&empty).map_err(|e| e.to_string())?;
            let ops =
                injection_patch(&empty, &info, cfg, inp.profile).map_err(|e| e.to_string())?;
            let mut pod = empty;
            apply_patch(&mut pod, &ops)?;
            (pod, Some("no pod given: the proxy alone is checked".into()))
        }
    };
    if let Some(n) = pod.get_mut("metadata").and_then(|m| m.get_mut("namespace")) {
        *n = json!(inp.namespace);
    }
    Ok((pod, note))
}

fn proxy_resources(pod: &Value, cfg: &InjectorConfig, profile: &MeshProfile) -> Value {
    let name = cfg.proxy_name(profile);
    // The proxy is a container (classic layout) or an init container (native sidecar).
    ["/spec/containers", "/spec/initContainers"]
        .iter()
        .filter_map(|list| pod.pointer(list).and_then(Value::as_array))
        .flatten()
        .find(|c| c.get("name").and_then(Value::as_str) == Some(name))
        .and_then(|c| c.get("resources").cloned())
        .or_else(|| cfg.proxy.resources.as_ref().map(|r| json!(r)))
        .or_else(|| cfg.istio().ok().and_then(|s| s.resources.clone()))
        .unwrap_or_else(|| json!({}))
}

fn resource_quota(inp: &Inputs, cfg: &Config) -> Outcome {
    let quotas = match &inp.cluster.quotas {
        Ok(q) => q,
        Err(e) => return unknown(e.clone()),
    };
    let c = match cfg {
        Ok(c) => &c.config,
        Err(_) => return unknown(cfg_unusable(cfg).unwrap_or_default()),
    };
    if quotas.is_empty() {
        return pass(vec![format!(
            "no ResourceQuota in namespace {}",
            inp.namespace
        )]);
    }
    let (pod, note) = match injected(inp, c) {
        Ok(x) => x,
        Err(e) => return unknown(e),
    };
    let res = proxy_resources(&pod, c, inp.profile);
    let proxy_value = |kind: &str, r: &str| {
        res.get(kind)
            .and_then(|m| m.get(r))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let mut evidence = Vec::new();
    evidence.extend(note);
    evidence.push(format!("the proxy's resources: {res}"));
    let mut problems = Vec::new();
    for q in quotas {
        let qname = q.metadata.name.as_deref().unwrap_or("?");
        let status = q.status.as_ref();
        let hard = status
            .and_then(|s| s.hard.clone())
            .or_else(|| q.spec.as_ref().and_then(|s| s.hard.clone()))
            .unwrap_or_default();
        let used = status.and_then(|s| s.used.clone()).unwrap_or_default();
        for (key, h) in &hard {
            let (kind, r) = match key.as_str() {
                "cpu" | "requests.cpu" => ("requests", "cpu"),
                "memory" | "requests.memory" => ("requests", "memory"),
                "limits.cpu" => ("limits", "cpu"),
                "limits.memory" => ("limits", "memory"),
                _ => continue,
            };
            let Some(need) = proxy_value(kind, r) else {
                if kind == "limits" {
                    problems.push(format!(
                        "quota {qname} tracks {key} but the proxy sets no {r} limit: the API server refuses pods without one"
                    ));
                }
                continue;
            };
            let u = used.get(key).map_or("0", |q| q.0.as_str());
            let (Some(hv), Some(uv), Some(nv)) = (amount(&h.0), amount(u), amount(&need)) else {
                evidence.push(format!("quota {qname} {key}: unreadable quantity"));
                continue;
            };
            let left = hv - uv;
            let line = format!(
                "quota {qname} {key}: hard {}, used {u}, the proxy needs {need}",
                h.0
            );
            if nv > left + f64::EPSILON * hv.abs().max(1.0) {
                problems.push(format!("{line}: NOT enough left"));
            } else {
                evidence.push(line);
            }
        }
    }
    if problems.is_empty() {
        return pass(evidence);
    }
    evidence.extend(problems);
    let k = &inp.profile.resources;
    fail(
        evidence,
        format!(
            "raise the quota (kubectl -n {} edit resourcequota NAME, spec.hard), or lower the proxy's share with the pod template annotations {}, {}, {}, {}",
            inp.namespace, k.cpu_request, k.memory_request, k.cpu_limit, k.memory_limit
        ),
    )
}

// 13 -----------------------------------------------------------------------------------------

fn pod_security(inp: &Inputs, cfg: &Config) -> Outcome {
    let namespace = match &inp.cluster.namespace {
        Ok(n) => n,
        Err(e) => return unknown(e.clone()),
    };
    let c = match cfg {
        Ok(c) => &c.config,
        Err(_) => return unknown(cfg_unusable(cfg).unwrap_or_default()),
    };
    let key = "pod-security.kubernetes.io/enforce";
    let raw = fetch::label(&namespace.metadata.labels, key);
    let mut evidence = Vec::new();
    let level = match raw {
        None => {
            evidence.push(format!(
                "namespace {} has no {key} label: privileged",
                inp.namespace
            ));
            Level::Privileged
        }
        Some(v) => match Level::parse(v) {
            Some(l) => {
                evidence.push(format!("namespace {} enforces {v}", inp.namespace));
                l
            }
            None => {
                evidence.push(format!(
                    "namespace {} has {key}={v:?}, not a level: Pod Security admission enforces restricted",
                    inp.namespace
                ));
                Level::Restricted
            }
        },
    };
    if level == Level::Privileged {
        return pass(evidence);
    }
    let (pod, note) = match injected(inp, c) {
        Ok(x) => x,
        Err(e) => return unknown(e),
    };
    evidence.extend(note);
    let proxy = c.proxy_name(inp.profile);
    let v = pss::violations(&pod, level);
    if v.is_empty() {
        evidence.push("every container, the proxy included, meets it".into());
        return pass(evidence);
    }
    let mut proxy_bad = false;
    let mut apps = Vec::new();
    for (container, why) in &v {
        if container == proxy {
            proxy_bad = true;
            evidence.push(format!("container {container} (the injected proxy): {why}"));
        } else {
            if !apps.contains(container) {
                apps.push(container.clone());
            }
            evidence.push(format!("container {container}: {why}"));
        }
    }
    evidence.push("the API server refuses the pod (\"violates PodSecurity\")".into());
    let mut fix = Vec::new();
    if proxy_bad {
        fix.push(format!(
            "the proxy template breaks the level: check proxy in configmap {SYSTEM_NS}/{INJECTOR} (podwire's proxy meets restricted as shipped)"
        ));
    }
    if !apps.is_empty() {
        fix.push(format!(
            "set on container(s) {}: securityContext {{allowPrivilegeEscalation: false, capabilities: {{drop: [ALL]}}, runAsNonRoot: true, runAsUser: <non-zero>, seccompProfile: {{type: RuntimeDefault}}}}; or relax the namespace: kubectl label namespace {} {key}=baseline --overwrite",
            apps.join(", "),
            inp.namespace
        ));
    }
    fail(evidence, fix.join("\n"))
}

// 14 -----------------------------------------------------------------------------------------

/// The agent's `--repair` mode from its DaemonSet, and how it was found (default `label`).
fn repair_mode(inp: &Inputs) -> (Repair, String) {
    let Ok(ds) = &inp.cluster.agent else {
        return (
            Repair::default(),
            format!(
                "{} (assumed: the DaemonSet could not be read)",
                Repair::default()
            ),
        );
    };
    let args: Vec<&String> = ds
        .spec
        .iter()
        .flat_map(|s| s.template.spec.iter())
        .flat_map(|p| p.containers.iter())
        .flat_map(|c| c.args.iter().flatten())
        .collect();
    let given = args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix("--repair=").map(str::to_string).or_else(|| {
            (a.as_str() == "--repair")
                .then(|| args.get(i + 1).map(|v| v.to_string()))
                .flatten()
        })
    });
    match given {
        None => (Repair::default(), Repair::default().to_string()),
        Some(v) => match v.parse::<Repair>() {
            Ok(r) => (r, r.to_string()),
            Err(e) => (
                Repair::default(),
                format!(
                    "{} (assumed: the DaemonSet's --repair {e})",
                    Repair::default()
                ),
            ),
        },
    }
}

fn rbac_check(inp: &Inputs) -> Outcome {
    let r = match &inp.cluster.rbac {
        Ok(r) => r,
        Err(e) => return unknown(e.clone()),
    };
    let (mode, repair) = repair_mode(inp);
    let mut evidence = Vec::new();
    let mut bad = false;
    for (sa, needs) in [
        (fetch::AGENT, rbac::agent_needs(mode)),
        ("podwire-injector", rbac::injector_needs()),
    ] {
        let missing = rbac::missing(r, SYSTEM_NS, sa, &needs);
        let who = format!("system:serviceaccount:{SYSTEM_NS}:{sa}");
        if missing.is_empty() {
            evidence.push(format!("{who}: all {} permissions granted", needs.len()));
        } else {
            bad = true;
            evidence.push(format!("{who} is missing:"));
            evidence.extend(missing.into_iter().map(|m| format!("  {m}")));
        }
    }
    evidence.push(format!("(agent --repair={repair})"));
    if bad {
        fail(
            evidence,
            "re-apply podwire's RBAC (ClusterRoles/Roles podwire-agent and podwire-injector and their bindings): kubectl apply -f install/podwire.yaml\nverify: kubectl auth can-i VERB RESOURCE --as system:serviceaccount:podwire-system:NAME",
        )
    } else {
        pass(evidence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_proxy_follows_go() {
        let h = "podwire-injector.podwire-system.svc";
        for (np, want) in [
            (".svc", true),
            ("svc", true),
            ("*.svc", true),
            ("*", true),
            (h, true),
            ("podwire-system.svc", true),
            (".podwire-system.svc", true),
            ("127.0.0.1,localhost,10.0.0.0/8", false),
            ("", false),
            ("other.svc", false),
            (".svc:443", true),
            (".svc:8443", false),
            ("x.podwire-injector.podwire-system.svc", false),
        ] {
            assert_eq!(bypasses(np, h), want, "{np:?}");
        }
    }

    #[test]
    fn amounts_scale_by_suffix() {
        assert_eq!(amount("100m"), Some(0.1));
        assert_eq!(amount("128Mi"), Some(128.0 * 1024.0 * 1024.0));
        assert_eq!(amount("2"), Some(2.0));
        assert_eq!(amount("1e3"), Some(1000.0));
        assert_eq!(amount("1k"), Some(1000.0));
        assert_eq!(amount("abc"), None);
    }

    #[test]
    fn relabel_makes_the_selector_match() {
        let p = MeshProfile::istio();
        let opt_in = LabelSelector::match_label("istio-injection", "enabled");
        assert_eq!(
            relabel(&opt_in, &Labels::new(), &p),
            ["istio-injection=enabled"]
        );
        let opt_out: LabelSelector = serde_json::from_value(json!({"matchExpressions": [
            {"key": "istio-injection", "operator": "NotIn", "values": ["disabled"]}]}))
        .expect("selector");
        let disabled = Labels::from([("istio-injection".to_string(), "disabled".to_string())]);
        assert_eq!(
            relabel(&opt_out, &disabled, &p),
            ["istio-injection=enabled"]
        );
        assert_eq!(mode(&opt_out), "opt-out");
        assert_eq!(mode(&opt_in), "opt-in");
    }
}
