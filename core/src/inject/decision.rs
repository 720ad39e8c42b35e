//! Whether the injector adds the proxy to a pod, in DESIGN.md's order, with a reason a
//! person can read. The webhook, `podwire-injector review` and `podwire explain|inject` all
//! call [`decide`], so they cannot disagree.

use super::config::{InjectorConfig, Policy};
use super::selector::{LabelSelector, Labels};
use crate::{MeshProfile, PodInfo};
use serde::Serialize;

/// The rule that settled the outcome (also a stable label for logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    HostNetwork,
    IgnoredNamespace,
    AlreadyInjected,
    Explicit,
    NeverInjectSelector,
    AlwaysInjectSelector,
    Policy,
    NamespaceSelector,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::HostNetwork => "host-network",
            Step::IgnoredNamespace => "ignored-namespace",
            Step::AlreadyInjected => "already-injected",
            Step::Explicit => "explicit",
            Step::NeverInjectSelector => "never-inject-selector",
            Step::AlwaysInjectSelector => "always-inject-selector",
            Step::Policy => "policy",
            Step::NamespaceSelector => "namespace-selector",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub inject: bool,
    pub step: Step,
    /// Starts with `injected:` or `skipped:`.
    pub reason: String,
    /// Things that would surprise the pod's author (an ignored `inject: "true"`, an ignored
    /// value), for AdmissionResponse warnings and `explain`.
    pub warnings: Vec<String>,
}

/// The pod's own `sidecar.istio.io/inject`: the label if present, else the annotation.
struct Explicit {
    /// `label sidecar.istio.io/inject="true"`, for messages.
    source: String,
    value: Option<bool>,
    /// Set when the label hides an annotation with another value.
    shadowed: Option<String>,
}

fn explicit(pod: &PodInfo, key: &str) -> Option<Explicit> {
    let label = pod.label(key);
    let annotation = pod.annotation(key);
    let (kind, v) = match (label, annotation) {
        (Some(l), _) => ("label", l),
        (None, Some(a)) => ("annotation", a),
        (None, None) => return None,
    };
    let shadowed = match (label, annotation) {
        (Some(l), Some(a)) if l != a => Some(format!(
            "annotation {key}={a:?} is overridden by the label {key}={l:?} (the label wins)"
        )),
        _ => None,
    };
    Some(Explicit {
        source: format!("{kind} {key}={v:?}"),
        value: match v {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        },
        shadowed,
    })
}

/// Decide for `pod` (whose `metadata.namespace` the caller has resolved: the pod's own, else
/// the AdmissionRequest's, else `default`). `namespace_labels` are the labels of that
/// namespace when known; when `None`, the API server has already applied the webhook's
/// namespaceSelector and step 7 is skipped.
pub fn decide(
    pod: &PodInfo,
    namespace_labels: Option<&Labels>,
    cfg: &InjectorConfig,
    profile: &MeshProfile,
) -> Decision {
    let ns = pod.namespace();
    let key = profile.inject_key;
    let exp = explicit(pod, key);
    let mut warnings = Vec::new();
    // An explicit "true" that a rule overrides deserves a warning: the author asked for a proxy.
    let skip =
        |step: Step, reason: String, why_ignored: Option<&str>, mut warnings: Vec<String>| {
            if let (Some(e), Some(why)) =
                (exp.as_ref().filter(|e| e.value == Some(true)), why_ignored)
            {
                warnings.push(format!("{} is ignored: {why}", e.source));
            }
            Decision {
                inject: false,
                step,
                reason: format!("skipped: {reason}"),
                warnings,
            }
        };

    // 1. The redirection is programmed in the pod's netns; with hostNetwork that is the node's.
    if pod.spec.host_network {
        return skip(
            Step::HostNetwork,
            "pod uses hostNetwork: true; redirection would hit the node".into(),
            Some("pods with hostNetwork are never injected"),
            warnings,
        );
    }
    // 2. System pods must start even when the mesh is broken.
    if let Some(why) = cfg.ignored_namespace(ns) {
        return skip(
            Step::IgnoredNamespace,
            format!("namespace {ns} {why}"),
            Some(&format!("namespace {ns} {why}")),
            warnings,
        );
    }
    // 3. Never a second proxy. As Istio: only the status annotation says "injected"; a pod
    // that declares its own istio-proxy container is customising it, not injected.
    if pod.annotation(profile.status_key).is_some() {
        return skip(
            Step::AlreadyInjected,
            format!(
                "already injected (annotation {} present)",
                profile.status_key
            ),
            None,
            warnings,
        );
    }

    // 4-6: what the pod and the config ask for, before namespace selection.
    let (inject, step, reason) = match &exp {
        Some(Explicit {
            source,
            value: Some(v),
            shadowed,
        }) => {
            warnings.extend(shadowed.clone());
            let verb = if *v { "injected" } else { "skipped" };
            (*v, Step::Explicit, format!("{verb}: {source} on the pod"))
        }
        other => {
            if let Some(e) = other {
                warnings.extend(e.shadowed.clone());
                warnings.push(format!(
                    "{} is ignored: only \"true\" or \"false\" decide; the default applies",
                    e.source
                ));
            }
            by_default(pod, cfg, &mut warnings)
        }
    };
    if !inject {
        return Decision {
            inject,
            step,
            reason,
            warnings,
        };
    }

    // 7. Namespace selection overrides everything above (truth table, seeds/001).
    let Some(labels) = namespace_labels else {
        return Decision {
            inject,
            step,
            reason: format!(
                "{reason}; namespace labels not given, so the webhook's namespaceSelector is \
                 assumed to select namespace {ns}"
            ),
            warnings,
        };
    };
    let selector = cfg.namespace_selector(profile);
    let mut labels = labels.clone();
    // The API server labels every namespace with its name; selectors may rely on it.
    labels
        .entry("kubernetes.io/metadata.name".into())
        .or_insert_with(|| ns.to_string());
    if selector.matches(&labels) {
        return Decision {
            inject,
            step,
            reason,
            warnings,
        };
    }
    let why =
        format!("namespace {ns} is not selected by the webhook's namespaceSelector ({selector})");
    let reason = format!(
        "{why}; {}{}",
        describe_labels(&selector, &labels),
        hint(&selector, ns)
    );
    skip(Step::NamespaceSelector, reason, Some(&why), warnings)
}

/// Steps 5 and 6: no explicit value on the pod.
fn by_default(
    pod: &PodInfo,
    cfg: &InjectorConfig,
    warnings: &mut Vec<String>,
) -> (bool, Step, String) {
    let labels = &pod.metadata.labels;
    // Istio skips empty selectors here, so an empty entry never forces a decision.
    let matching = |list: &[LabelSelector]| {
        list.iter()
            .enumerate()
            .find(|(_, s)| !s.is_empty() && s.matches(labels))
            .map(|(i, s)| format!("[{i}] ({s})"))
    };
    if let Some(m) = matching(&cfg.never_inject_selector) {
        return (
            false,
            Step::NeverInjectSelector,
            format!("skipped: pod labels match neverInjectSelector{m}"),
        );
    }
    if let Some(m) = matching(&cfg.always_inject_selector) {
        return (
            true,
            Step::AlwaysInjectSelector,
            format!("injected: pod labels match alwaysInjectSelector{m}"),
        );
    }
    match &cfg.policy {
        Policy::Enabled => (
            true,
            Step::Policy,
            "injected: policy is enabled and the pod does not opt out".into(),
        ),
        Policy::Disabled => (
            false,
            Step::Policy,
            "skipped: policy is disabled and the pod does not opt in".into(),
        ),
        Policy::Unrecognized(p) => {
            warnings.push(format!(
                "injector policy {p:?} is not recognized (enabled|disabled): pods are not injected by default"
            ));
            (
                false,
                Step::Policy,
                format!(
                    "skipped: policy {p:?} is not recognized (only enabled or disabled), so \
                     injection is off by default"
                ),
            )
        }
    }
}

/// The namespace's values for the keys the selector looks at.
fn describe_labels(selector: &LabelSelector, labels: &Labels) -> String {
    let mut keys: Vec<&str> = selector.match_labels.keys().map(String::as_str).collect();
    keys.extend(selector.match_expressions.iter().map(|r| r.key.as_str()));
    keys.sort_unstable();
    keys.dedup();
    let parts: Vec<String> = keys
        .iter()
        .map(|k| match labels.get(*k) {
            Some(v) => format!("{k}={v}"),
            None => format!("no {k} label"),
        })
        .collect();
    format!("the namespace has {}", parts.join(", "))
}

/// How to select the namespace, when the selector is a plain `matchLabels`.
fn hint(selector: &LabelSelector, ns: &str) -> String {
    if !selector.match_expressions.is_empty() || selector.match_labels.is_empty() {
        return String::new();
    }
    let labels: Vec<String> = selector
        .match_labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    format!(
        " (to select it: kubectl label namespace {ns} {} --overwrite)",
        labels.join(" ")
    )
}
