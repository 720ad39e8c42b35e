//! "The result of sidecar injection was not what I expected": the namespace, hostNetwork,
//! the webhook's namespaceSelector, the default policy and the per-pod override, in the
//! document's order.

use super::*;
pub(super) fn system_namespace(inp: &Inputs, cfg: &Config) -> Outcome {
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

pub(super) fn host_network(inp: &Inputs) -> Outcome {
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

pub(super) fn core_selector(w: &MutatingWebhook) -> Result<LabelSelector, String> {
    match &w.namespace_selector {
        None => Ok(LabelSelector::default()),
        Some(sel) => serde_json::to_value(sel)
            .and_then(serde_json::from_value)
            .map_err(|e| format!("webhook {}: namespaceSelector: {e}", w.name)),
    }
}

/// Labels that make `sel` match, as `kubectl label` arguments (`k=v` or `k-`).
pub(super) fn relabel(sel: &LabelSelector, labels: &Labels, profile: &MeshProfile) -> Vec<String> {
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

pub(super) fn mode(sel: &LabelSelector) -> &'static str {
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

pub(super) fn namespace_selector(inp: &Inputs) -> Outcome {
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

pub(super) fn default_policy(inp: &Inputs, cfg: &Config) -> Outcome {
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

pub(super) fn meta_value<'a>(meta: &'a Value, section: &str, key: &str) -> Option<&'a str> {
    meta.get(section)?.get(key)?.as_str()
}

pub(super) fn pod_annotation(inp: &Inputs) -> Outcome {
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

#[cfg(test)]
mod tests {
    use super::*;

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
