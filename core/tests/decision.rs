//! The injection decision: every row of the seed truth table (seeds/001) and DESIGN.md's
//! precedence rules, table-driven.

use podwire_core::inject::selector::{Operator, Requirement};
use podwire_core::inject::{decide, InjectorConfig, LabelSelector, Labels, Policy, Step};
use podwire_core::{MeshProfile, PodInfo};
use serde_json::json;

const INJECT: &str = "sidecar.istio.io/inject";

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Where the pod states `sidecar.istio.io/inject`.
#[derive(Debug, Clone, Copy)]
enum On {
    Label,
    Annotation,
}

#[derive(Debug, Clone, Default)]
struct PodB {
    ns: Option<&'static str>,
    labels: Vec<(&'static str, &'static str)>,
    annotations: Vec<(&'static str, &'static str)>,
    containers: Vec<&'static str>,
    host_network: bool,
}

impl PodB {
    fn new() -> Self {
        PodB {
            ns: Some("shop"),
            containers: vec!["app"],
            ..Default::default()
        }
    }
    fn ns(mut self, ns: &'static str) -> Self {
        self.ns = Some(ns);
        self
    }
    fn no_ns(mut self) -> Self {
        self.ns = None;
        self
    }
    fn label(mut self, k: &'static str, v: &'static str) -> Self {
        self.labels.push((k, v));
        self
    }
    fn annotation(mut self, k: &'static str, v: &'static str) -> Self {
        self.annotations.push((k, v));
        self
    }
    fn inject(self, on: On, v: &'static str) -> Self {
        match on {
            On::Label => self.label(INJECT, v),
            On::Annotation => self.annotation(INJECT, v),
        }
    }
    fn container(mut self, c: &'static str) -> Self {
        self.containers.push(c);
        self
    }
    fn host_network(mut self) -> Self {
        self.host_network = true;
        self
    }
    fn build(&self) -> PodInfo {
        let mut meta = json!({"generateName": "web-5d8f9-"});
        if let Some(ns) = self.ns {
            meta["namespace"] = json!(ns);
        }
        if !self.labels.is_empty() {
            meta["labels"] = json!(labels(&self.labels));
        }
        if !self.annotations.is_empty() {
            meta["annotations"] = json!(labels(&self.annotations));
        }
        let containers: Vec<_> = self.containers.iter().map(|c| json!({"name": c})).collect();
        serde_json::from_value(json!({
            "metadata": meta,
            "spec": {"hostNetwork": self.host_network, "containers": containers}
        }))
        .expect("pod")
    }
}

fn cfg(policy: Policy) -> InjectorConfig {
    InjectorConfig {
        policy,
        ..Default::default()
    }
}

fn opt_out() -> LabelSelector {
    LabelSelector {
        match_expressions: vec![Requirement {
            key: "istio-injection".into(),
            operator: Operator::NotIn,
            values: vec!["disabled".into()],
        }],
        ..Default::default()
    }
}

fn run(
    pod: &PodB,
    ns_labels: Option<&Labels>,
    cfg: &InjectorConfig,
) -> podwire_core::inject::Decision {
    let d = decide(&pod.build(), ns_labels, cfg, &MeshProfile::istio());
    assert!(
        d.reason
            .starts_with(if d.inject { "injected: " } else { "skipped: " }),
        "reason must say the outcome first: {d:?}"
    );
    d
}

/// seeds/001: namespaceSelector match × default policy × pod override → injected?
const TRUTH_TABLE: [(bool, Policy, Option<&str>, bool); 12] = [
    (true, Policy::Enabled, Some("true"), true),
    (true, Policy::Enabled, Some("false"), false),
    (true, Policy::Enabled, None, true),
    (true, Policy::Disabled, Some("true"), true),
    (true, Policy::Disabled, Some("false"), false),
    (true, Policy::Disabled, None, false),
    (false, Policy::Enabled, Some("true"), false),
    (false, Policy::Enabled, Some("false"), false),
    (false, Policy::Enabled, None, false),
    (false, Policy::Disabled, Some("true"), false),
    (false, Policy::Disabled, Some("false"), false),
    (false, Policy::Disabled, None, false),
];

#[test]
fn seed_truth_table_opt_in() {
    // Opt-in (the default namespaceSelector): istio-injection=enabled selects.
    let selected = labels(&[("istio-injection", "enabled")]);
    let unselected = labels(&[("team", "shop")]);
    for (ns_match, policy, value, want) in TRUTH_TABLE {
        for on in [On::Label, On::Annotation] {
            let mut pod = PodB::new();
            if let Some(v) = value {
                pod = pod.inject(on, v);
            }
            let ns = if ns_match { &selected } else { &unselected };
            let d = run(&pod, Some(ns), &cfg(policy.clone()));
            assert_eq!(
                d.inject, want,
                "ns match {ns_match}, policy {policy}, {on:?} {value:?}: {d:?}"
            );
        }
    }
}

#[test]
fn seed_truth_table_opt_out() {
    // Opt-out: every namespace not labelled istio-injection=disabled.
    let c = |policy: Policy| InjectorConfig {
        namespace_selector: Some(opt_out()),
        ..cfg(policy)
    };
    let selected = labels(&[]);
    let unselected = labels(&[("istio-injection", "disabled")]);
    for (ns_match, policy, value, want) in TRUTH_TABLE {
        let mut pod = PodB::new();
        if let Some(v) = value {
            pod = pod.inject(On::Annotation, v);
        }
        let ns = if ns_match { &selected } else { &unselected };
        let d = run(&pod, Some(ns), &c(policy.clone()));
        assert_eq!(
            d.inject, want,
            "opt-out {ns_match} {policy} {value:?}: {d:?}"
        );
    }
}

#[test]
fn seed_truth_table_with_namespace_labels_unknown() {
    // The API server only calls the webhook for selected namespaces: the "yes" rows.
    for (ns_match, policy, value, want) in TRUTH_TABLE {
        if !ns_match {
            continue;
        }
        let mut pod = PodB::new();
        if let Some(v) = value {
            pod = pod.inject(On::Annotation, v);
        }
        let d = run(&pod, None, &cfg(policy.clone()));
        assert_eq!(d.inject, want, "{policy} {value:?}: {d:?}");
        if d.inject {
            assert!(d.reason.contains("namespace labels not given"), "{d:?}");
        } else {
            assert!(!d.reason.contains("namespace labels"), "{d:?}");
        }
    }
}

#[test]
fn unselected_namespace_explains_and_warns_on_explicit_true() {
    let d = run(
        &PodB::new().inject(On::Annotation, "true"),
        Some(&labels(&[])),
        &cfg(Policy::Enabled),
    );
    assert_eq!((d.inject, d.step), (false, Step::NamespaceSelector));
    assert!(
        d.reason.contains("namespace shop is not selected by the webhook's namespaceSelector (istio-injection=enabled)"),
        "{}",
        d.reason
    );
    assert!(
        d.reason.contains("no istio-injection label"),
        "{}",
        d.reason
    );
    assert!(
        d.reason
            .contains("kubectl label namespace shop istio-injection=enabled"),
        "{}",
        d.reason
    );
    assert_eq!(d.warnings.len(), 1, "{d:?}");
    assert!(d.warnings[0].starts_with(
        "annotation sidecar.istio.io/inject=\"true\" is ignored: namespace shop is not selected"
    ));

    // Selected by policy, not by the pod: nothing to warn the author about.
    let d = run(&PodB::new(), Some(&labels(&[])), &cfg(Policy::Enabled));
    assert!(!d.inject && d.warnings.is_empty(), "{d:?}");

    // Opt-out mode names the label that deselects.
    let c = InjectorConfig {
        namespace_selector: Some(opt_out()),
        ..cfg(Policy::Enabled)
    };
    let d = run(
        &PodB::new(),
        Some(&labels(&[("istio-injection", "disabled")])),
        &c,
    );
    assert!(
        d.reason.contains("(istio-injection notin (disabled))")
            && d.reason
                .contains("the namespace has istio-injection=disabled"),
        "{}",
        d.reason
    );
}

#[test]
fn host_network_is_never_injected() {
    for (pod, warns) in [
        (PodB::new().host_network(), false),
        (PodB::new().host_network().inject(On::Label, "true"), true),
        (
            PodB::new().host_network().inject(On::Annotation, "true"),
            true,
        ),
        (
            PodB::new().host_network().inject(On::Annotation, "false"),
            false,
        ),
        (PodB::new().host_network().label("mesh", "always"), false),
    ] {
        let c = InjectorConfig {
            always_inject_selector: vec![LabelSelector::match_label("mesh", "always")],
            ..cfg(Policy::Enabled)
        };
        let d = run(&pod, Some(&labels(&[("istio-injection", "enabled")])), &c);
        assert_eq!((d.inject, d.step), (false, Step::HostNetwork), "{pod:?}");
        assert!(d.reason.contains("hostNetwork"), "{}", d.reason);
        assert_eq!(!d.warnings.is_empty(), warns, "{pod:?}: {:?}", d.warnings);
    }
    let d = run(
        &PodB::new().host_network().inject(On::Annotation, "true"),
        None,
        &cfg(Policy::Enabled),
    );
    assert_eq!(
        d.warnings,
        vec!["annotation sidecar.istio.io/inject=\"true\" is ignored: pods with hostNetwork are never injected"]
    );
}

#[test]
fn system_and_ignored_namespaces_are_never_injected() {
    let c = InjectorConfig {
        ignored_namespaces: vec!["istio-system".into()],
        ..cfg(Policy::Enabled)
    };
    let selected = labels(&[("istio-injection", "enabled")]);
    for ns in [
        "kube-system",
        "kube-public",
        "kube-node-lease",
        "local-path-storage",
        "istio-system",
    ] {
        for pod in [
            PodB::new().ns(ns),
            PodB::new().ns(ns).inject(On::Label, "true"),
        ] {
            let d = run(&pod, Some(&selected), &c);
            assert_eq!((d.inject, d.step), (false, Step::IgnoredNamespace), "{ns}");
            assert!(
                d.reason
                    .starts_with(&format!("skipped: namespace {ns} is never injected")),
                "{}",
                d.reason
            );
        }
    }
    let d = run(&PodB::new().ns("kube-system"), None, &c);
    assert_eq!(d.reason, "skipped: namespace kube-system is never injected");
    let d = run(&PodB::new().ns("istio-system"), None, &c);
    assert_eq!(
        d.reason,
        "skipped: namespace istio-system is never injected (ignoredNamespaces)"
    );
    let d = run(
        &PodB::new().ns("kube-system").inject(On::Annotation, "true"),
        None,
        &c,
    );
    assert_eq!(d.warnings.len(), 1);
}

#[test]
fn an_injected_pod_gets_no_second_proxy() {
    // Only the status annotation says "injected" (as Istio).
    for pod in [
        PodB::new().annotation("sidecar.istio.io/status", "{}"),
        PodB::new()
            .container("istio-proxy")
            .annotation("sidecar.istio.io/status", "{}")
            .inject(On::Label, "true"),
    ] {
        let d = run(&pod, None, &cfg(Policy::Enabled));
        assert_eq!(
            (d.inject, d.step),
            (false, Step::AlreadyInjected),
            "{pod:?}"
        );
        assert!(
            d.reason.starts_with("skipped: already injected"),
            "{}",
            d.reason
        );
        assert!(d.warnings.is_empty());
    }
}

#[test]
fn a_pod_declaring_its_own_proxy_is_customising_it_not_injected() {
    // Istio's "customizing injection": the pod's istio-proxy is merged over the template.
    let d = run(
        &PodB::new().container("istio-proxy"),
        None,
        &cfg(Policy::Enabled),
    );
    assert_eq!((d.inject, d.step), (true, Step::Policy), "{}", d.reason);
    let mut c = cfg(Policy::Enabled);
    c.proxy.name = Some("envoy".into());
    let d = run(&PodB::new().container("envoy"), None, &c);
    assert!(d.inject, "{}", d.reason);
}

#[test]
fn label_wins_over_annotation() {
    let both = |l: &'static str, a: &'static str| {
        PodB::new().inject(On::Label, l).inject(On::Annotation, a)
    };
    for (pod, want) in [
        (both("false", "true"), false),
        (both("true", "false"), true),
    ] {
        let d = run(&pod, None, &cfg(Policy::Enabled));
        assert_eq!((d.inject, d.step), (want, Step::Explicit));
        assert!(
            d.reason.contains("label sidecar.istio.io/inject"),
            "{}",
            d.reason
        );
        assert!(
            d.warnings
                .iter()
                .any(|w| w.contains("overridden by the label")),
            "{:?}",
            d.warnings
        );
    }
    // Same value twice: nothing to warn about.
    let d = run(&both("true", "true"), None, &cfg(Policy::Disabled));
    assert!(d.inject && d.warnings.is_empty(), "{d:?}");
}

#[test]
fn other_values_are_ignored_with_a_warning() {
    for value in ["yes", "True", "1", "", "enabled"] {
        for on in [On::Label, On::Annotation] {
            for (policy, want) in [(Policy::Enabled, true), (Policy::Disabled, false)] {
                let d = run(&PodB::new().inject(on, value), None, &cfg(policy.clone()));
                assert_eq!(
                    (d.inject, d.step),
                    (want, Step::Policy),
                    "{value:?} {on:?} {policy}"
                );
                assert_eq!(d.warnings.len(), 1, "{d:?}");
                assert!(
                    d.warnings[0]
                        .contains(&format!("sidecar.istio.io/inject={value:?} is ignored"))
                        && d.warnings[0].contains("the default applies"),
                    "{:?}",
                    d.warnings
                );
            }
        }
    }
    // An invalid label hides a valid annotation (the label is the one read), and says so.
    let d = run(
        &PodB::new()
            .inject(On::Label, "yes")
            .inject(On::Annotation, "false"),
        None,
        &cfg(Policy::Enabled),
    );
    assert!(d.inject, "{d:?}");
    assert_eq!(d.warnings.len(), 2, "{d:?}");
}

#[test]
fn selectors_come_after_the_explicit_value_and_before_the_policy() {
    let c = |policy: Policy| InjectorConfig {
        never_inject_selector: vec![
            LabelSelector::default(), // empty: skipped, as in Istio
            LabelSelector {
                match_expressions: vec![Requirement {
                    key: "openshift.io/build.name".into(),
                    operator: Operator::Exists,
                    values: vec![],
                }],
                ..Default::default()
            },
        ],
        always_inject_selector: vec![LabelSelector {
            match_labels: labels(&[("mesh", "on")]),
            match_expressions: vec![Requirement {
                key: "tier".into(),
                operator: Operator::In,
                values: vec!["web".into(), "api".into()],
            }],
        }],
        ..cfg(policy)
    };
    let build = PodB::new().label("openshift.io/build.name", "b1");
    let always = PodB::new().label("mesh", "on").label("tier", "api");
    let cases: Vec<(PodB, Policy, bool, Step, &str)> = vec![
        // never beats the enabled policy
        (
            build.clone(),
            Policy::Enabled,
            false,
            Step::NeverInjectSelector,
            "neverInjectSelector[1] (openshift.io/build.name)",
        ),
        // always beats the disabled policy
        (
            always.clone(),
            Policy::Disabled,
            true,
            Step::AlwaysInjectSelector,
            "alwaysInjectSelector[0] (mesh=on,tier in (web,api))",
        ),
        // never beats always
        (
            always.clone().label("openshift.io/build.name", "b1"),
            Policy::Disabled,
            false,
            Step::NeverInjectSelector,
            "neverInjectSelector[1]",
        ),
        // explicit beats both
        (
            build.clone().inject(On::Annotation, "true"),
            Policy::Disabled,
            true,
            Step::Explicit,
            "annotation sidecar.istio.io/inject=\"true\"",
        ),
        (
            always.clone().inject(On::Label, "false"),
            Policy::Enabled,
            false,
            Step::Explicit,
            "label sidecar.istio.io/inject=\"false\"",
        ),
        // an ignored value falls through to the selectors
        (
            always.clone().inject(On::Annotation, "maybe"),
            Policy::Disabled,
            true,
            Step::AlwaysInjectSelector,
            "alwaysInjectSelector[0]",
        ),
        // partial match of the always selector: the policy decides
        (
            PodB::new().label("mesh", "on").label("tier", "db"),
            Policy::Disabled,
            false,
            Step::Policy,
            "policy is disabled",
        ),
        (
            PodB::new(),
            Policy::Enabled,
            true,
            Step::Policy,
            "policy is enabled",
        ),
    ];
    for (pod, policy, want, step, text) in cases {
        let d = run(&pod, None, &c(policy.clone()));
        assert_eq!((d.inject, d.step), (want, step), "{pod:?} {policy}: {d:?}");
        assert!(
            d.reason.contains(text),
            "{:?} should mention {text:?}",
            d.reason
        );
    }
}

#[test]
fn selectors_read_the_pods_labels_only() {
    let c = InjectorConfig {
        never_inject_selector: vec![LabelSelector::match_label("debug", "true")],
        ..cfg(Policy::Enabled)
    };
    let d = run(&PodB::new().annotation("debug", "true"), None, &c);
    assert!(d.inject, "{d:?}");
}

#[test]
fn unrecognized_policy_disables_default_injection() {
    let c = cfg(Policy::Unrecognized("Enabled".into()));
    let d = run(&PodB::new(), None, &c);
    assert_eq!((d.inject, d.step), (false, Step::Policy));
    assert!(
        d.reason.contains("policy \"Enabled\" is not recognized"),
        "{}",
        d.reason
    );
    assert_eq!(d.warnings.len(), 1);
    // DESIGN.md order: an explicit value is read before the policy.
    let d = run(&PodB::new().inject(On::Annotation, "true"), None, &c);
    assert_eq!((d.inject, d.step), (true, Step::Explicit));
}

#[test]
fn namespace_selection_overrides_every_yes() {
    let c = InjectorConfig {
        always_inject_selector: vec![LabelSelector::match_label("mesh", "on")],
        ..cfg(Policy::Enabled)
    };
    let unselected = labels(&[("istio-injection", "disabled")]);
    for pod in [
        PodB::new(),
        PodB::new().label("mesh", "on"),
        PodB::new().inject(On::Label, "true"),
    ] {
        let d = run(&pod, Some(&unselected), &c);
        assert_eq!(
            (d.inject, d.step),
            (false, Step::NamespaceSelector),
            "{pod:?}"
        );
    }
    // A "no" keeps its own reason: it was decided before namespace selection.
    let d = run(
        &PodB::new().inject(On::Annotation, "false"),
        Some(&unselected),
        &c,
    );
    assert_eq!(d.step, Step::Explicit);
}

#[test]
fn namespace_selector_sees_the_namespace_name_label() {
    // The API server labels every namespace kubernetes.io/metadata.name=<name>.
    let c = InjectorConfig {
        namespace_selector: Some(LabelSelector {
            match_expressions: vec![Requirement {
                key: "kubernetes.io/metadata.name".into(),
                operator: Operator::NotIn,
                values: vec!["legacy".into()],
            }],
            ..Default::default()
        }),
        ..cfg(Policy::Enabled)
    };
    assert!(run(&PodB::new(), Some(&labels(&[])), &c).inject);
    let d = run(&PodB::new().ns("legacy"), Some(&labels(&[])), &c);
    assert!(!d.inject);
    assert!(
        d.reason.contains("kubernetes.io/metadata.name=legacy"),
        "{}",
        d.reason
    );
}

#[test]
fn a_pod_without_namespace_is_in_default() {
    let d = run(
        &PodB::new().no_ns(),
        Some(&labels(&[])),
        &cfg(Policy::Enabled),
    );
    assert!(
        d.reason.contains("namespace default is not selected"),
        "{}",
        d.reason
    );
}

#[test]
fn decision_serializes_for_explain_json() {
    let d = run(&PodB::new(), None, &cfg(Policy::Enabled));
    let v = serde_json::to_value(&d).expect("json");
    assert_eq!(v["inject"], json!(true));
    assert_eq!(v["step"], json!("policy"));
    assert_eq!(Step::NeverInjectSelector.as_str(), "never-inject-selector");
    assert_eq!(
        serde_json::to_value(Step::NeverInjectSelector).expect("json"),
        json!("never-inject-selector")
    );
}
