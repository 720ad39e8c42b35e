//! Is this pod a mesh pod, from the plugin's point of view?
//!
//! DESIGN.md: its namespace is not excluded, it has the proxy container, it carries the status
//! annotation, the inject label/annotation is not `"false"`, and the interception mode is
//! `REDIRECT` (the default). As istio-cni, it also leaves alone a pod the mesh's own init
//! container redirects, a gateway (`proxy router`) and a proxyless pod (`DISABLE_ENVOY=true`).
//! Anything else passes through untouched.

use crate::pod::Container;
use crate::{MeshProfile, PodInfo};

#[derive(Debug)]
pub enum MeshDecision {
    /// Program the redirection.
    Redirect,
    /// Leave the pod alone; the reason is for people.
    PassThrough(String),
    /// An injected pod whose annotation makes no sense: neither redirected nor left alone,
    /// but refused (the runtime retries; the author sees the error on the pod).
    Refuse(crate::Error),
}

impl MeshDecision {
    pub fn is_redirect(&self) -> bool {
        matches!(self, MeshDecision::Redirect)
    }
}

/// Namespaces the plugin never touches unless configured otherwise.
pub const DEFAULT_EXCLUDED_NAMESPACES: [&str; 3] =
    ["kube-system", "kube-public", "kube-node-lease"];

/// Decided before any look-up: the agent's own pod and system pods must always start.
pub fn namespace_excluded(namespace: &str, excluded: &[String]) -> Option<String> {
    excluded
        .iter()
        .any(|n| n == namespace)
        .then(|| format!("pass-through: namespace {namespace} is excluded (excludeNamespaces)"))
}

/// Why an injected pod with this proxy container is left alone, if it is: a proxy that is not
/// a sidecar (a gateway) or a proxyless one. The webhook reads its merged sidecar the same way.
pub fn proxy_left_alone(proxy: &Container, profile: &MeshProfile) -> Option<String> {
    if let [cmd, kind, ..] = proxy.args.as_slice() {
        if cmd == profile.proxy_command && kind != profile.sidecar_type {
            return Some(format!(
                "{} runs as `{cmd} {kind}` (a gateway receives its traffic directly; only \
                 `{cmd} {}` is redirected)",
                profile.proxy_container, profile.sidecar_type
            ));
        }
    }
    let v = proxy.env_value(profile.proxyless_env)?;
    // Go's strconv.ParseBool, as the mesh's agent reads it.
    matches!(v, "1" | "t" | "T" | "true" | "TRUE" | "True").then(|| {
        format!(
            "{}={v} on {} (proxyless: nothing listens on the capture ports)",
            profile.proxyless_env, profile.proxy_container
        )
    })
}

pub fn mesh_decision(pod: &PodInfo, profile: &MeshProfile, excluded: &[String]) -> MeshDecision {
    let ns = pod.namespace();
    if let Some(reason) = namespace_excluded(ns, excluded) {
        return MeshDecision::PassThrough(reason);
    }
    if pod.spec.host_network {
        return MeshDecision::PassThrough(
            "pass-through: pod uses hostNetwork, redirection would hit the node".into(),
        );
    }
    let Some(proxy) = pod.container(profile.proxy_container) else {
        return MeshDecision::PassThrough(format!(
            "pass-through: pod has no {} container (not injected)",
            profile.proxy_container
        ));
    };
    // Istio only ever injects it as an init container; an app container of that name is an app.
    if pod
        .spec
        .init_containers
        .iter()
        .any(|c| c.name == profile.init_container)
    {
        return MeshDecision::PassThrough(format!(
            "pass-through: pod has the mesh's own {} init container, which programs its \
             redirection (injected without the mesh's CNI)",
            profile.init_container
        ));
    }
    if let Some(why) = proxy_left_alone(proxy, profile) {
        return MeshDecision::PassThrough(format!("pass-through: {why}"));
    }
    if pod.annotation(profile.status_key).is_none() {
        return MeshDecision::PassThrough(format!(
            "pass-through: pod has no {} annotation (not injected by the mesh)",
            profile.status_key
        ));
    }
    // The label wins over the annotation, as in the webhook's decision.
    let inject = pod
        .label(profile.inject_key)
        .or_else(|| pod.annotation(profile.inject_key));
    if inject == Some("false") {
        return MeshDecision::PassThrough(format!(
            "pass-through: {}=\"false\" on the pod",
            profile.inject_key
        ));
    }
    match pod.annotation(profile.interception_mode_key) {
        None | Some("REDIRECT") => MeshDecision::Redirect,
        // Modes the mesh knows and podwire does not program: the mesh's own business.
        Some(other) if MESH_MODES.contains(&other) => MeshDecision::PassThrough(format!(
            "pass-through: {}={other:?}; podwire only programs REDIRECT",
            profile.interception_mode_key
        )),
        // Anything else (a lower-case "redirect" among them) the injector refuses too: not a
        // reason to start the pod unredirected.
        Some(other) => MeshDecision::Refuse(crate::Error::InvalidAnnotation {
            key: profile.interception_mode_key.to_string(),
            value: other.to_string(),
            reason: "expected REDIRECT (or TPROXY or NONE, which podwire-cni leaves alone)"
                .to_string(),
        }),
    }
}

/// Interception modes the mesh knows and podwire-cni leaves to it.
const MESH_MODES: [&str; 2] = ["TPROXY", "NONE"];

/// Whether passing `pod` through deserves an operator's look: it is injected (the proxy and
/// the status annotation) and not left alone by design (a gateway or proxyless proxy, a mode
/// the mesh handles itself).
pub fn pass_through_is_surprising(pod: &PodInfo, profile: &MeshProfile) -> bool {
    let Some(proxy) = pod.container(profile.proxy_container) else {
        return false;
    };
    let by_design = proxy_left_alone(proxy, profile).is_some()
        || pod
            .annotation(profile.interception_mode_key)
            .is_some_and(|m| MESH_MODES.contains(&m));
    pod.annotation(profile.status_key).is_some() && !by_design
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::EnvVar;

    fn excluded() -> Vec<String> {
        DEFAULT_EXCLUDED_NAMESPACES
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    fn mesh_pod() -> PodInfo {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "shop",
                         "annotations": {"sidecar.istio.io/status": "{}"}},
            "spec": {"containers": [{"name": "app"}, {"name": "istio-proxy"}]}
        }))
        .expect("pod")
    }

    #[test]
    fn an_interception_mode_the_mesh_does_not_know_is_refused() {
        for mode in [
            "redirect",
            "Redirect",
            "TPROXY ",
            "tproxy",
            "",
            "REDIRECT,NONE",
        ] {
            let mut pod = mesh_pod();
            pod.metadata
                .annotations
                .insert("sidecar.istio.io/interceptionMode".into(), mode.into());
            match mesh_decision(&pod, &MeshProfile::istio(), &excluded()) {
                MeshDecision::Refuse(e) => {
                    let msg = e.to_string();
                    assert!(msg.contains("sidecar.istio.io/interceptionMode"), "{msg}");
                    assert!(msg.contains(&format!("{mode:?}")), "{msg}");
                }
                other => panic!("{mode:?}: {other:?}"),
            }
        }
        for mode in ["TPROXY", "NONE"] {
            let mut pod = mesh_pod();
            pod.metadata
                .annotations
                .insert("sidecar.istio.io/interceptionMode".into(), mode.into());
            let d = mesh_decision(&pod, &MeshProfile::istio(), &excluded());
            assert!(matches!(d, MeshDecision::PassThrough(_)), "{mode}: {d:?}");
        }
    }

    #[test]
    fn only_an_injected_pod_left_alone_not_by_design_is_surprising() {
        let p = MeshProfile::istio();
        let with = |k: &str, v: &str| {
            let mut pod = mesh_pod();
            pod.metadata.annotations.insert(k.into(), v.into());
            pod
        };
        assert!(pass_through_is_surprising(
            &with("sidecar.istio.io/inject", "false"),
            &p
        ));
        for mode in ["TPROXY", "NONE"] {
            let pod = with("sidecar.istio.io/interceptionMode", mode);
            assert!(!pass_through_is_surprising(&pod, &p), "{mode}");
        }
        let mut gateway = mesh_pod();
        gateway.spec.containers[1].args = vec!["proxy".into(), "router".into()];
        assert!(!pass_through_is_surprising(&gateway, &p));
        let mut not_injected = mesh_pod();
        not_injected.metadata.annotations.clear();
        assert!(!pass_through_is_surprising(&not_injected, &p));
    }

    #[test]
    fn mesh_pod_is_redirected() {
        assert!(mesh_decision(&mesh_pod(), &MeshProfile::istio(), &excluded()).is_redirect());
    }

    #[test]
    fn each_missing_condition_passes_through() {
        let p = MeshProfile::istio();
        let mut cases: Vec<(PodInfo, &str)> = Vec::new();
        let mut pod = mesh_pod();
        pod.metadata.namespace = "kube-system".into();
        cases.push((pod, "excluded"));
        let mut pod = mesh_pod();
        pod.spec.containers.retain(|c| c.name != "istio-proxy");
        cases.push((pod, "no istio-proxy"));
        let mut pod = mesh_pod();
        pod.metadata.annotations.clear();
        cases.push((pod, "no sidecar.istio.io/status"));
        let mut pod = mesh_pod();
        pod.metadata
            .annotations
            .insert("sidecar.istio.io/inject".into(), "false".into());
        cases.push((pod, "\"false\""));
        let mut pod = mesh_pod();
        pod.metadata
            .labels
            .insert("sidecar.istio.io/inject".into(), "false".into());
        cases.push((pod, "\"false\""));
        let mut pod = mesh_pod();
        pod.metadata
            .annotations
            .insert("sidecar.istio.io/interceptionMode".into(), "TPROXY".into());
        cases.push((pod, "only programs REDIRECT"));
        let mut pod = mesh_pod();
        pod.spec.host_network = true;
        cases.push((pod, "hostNetwork"));
        let mut pod = mesh_pod();
        pod.spec.init_containers.push(Container {
            name: "istio-init".into(),
            ..Container::default()
        });
        cases.push((pod, "istio-init init container"));
        let mut pod = mesh_pod();
        pod.spec.containers[1].args = vec!["proxy".into(), "router".into()];
        cases.push((pod, "`proxy router` (a gateway"));
        for yes in ["true", "1", "True"] {
            let mut pod = mesh_pod();
            pod.spec.containers[1].env = vec![EnvVar {
                name: "DISABLE_ENVOY".into(),
                value: Some(yes.into()),
            }];
            cases.push((pod, "proxyless"));
        }
        for (pod, want) in cases {
            match mesh_decision(&pod, &p, &excluded()) {
                MeshDecision::PassThrough(reason) => {
                    assert!(reason.contains(want), "{reason:?} should mention {want:?}")
                }
                other => panic!("{pod:?} must pass through ({want}): {other:?}"),
            }
        }
    }

    #[test]
    fn what_istio_cni_also_redirects_is_redirected() {
        // `proxy sidecar`, DISABLE_ENVOY false, another container's env: still a mesh pod.
        let pod: PodInfo = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "shop",
                         "annotations": {"sidecar.istio.io/status": "{}"}},
            "spec": {"containers": [
                {"name": "app", "env": [{"name": "DISABLE_ENVOY", "value": "true"}]},
                {"name": "istio-proxy", "args": ["proxy", "sidecar", "--domain", "x"],
                 "env": [{"name": "DISABLE_ENVOY", "value": "false"},
                         {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}]}
        }))
        .expect("pod");
        assert_eq!(
            pod.spec.containers[1].args,
            ["proxy", "sidecar"],
            "two args kept"
        );
        assert_eq!(
            pod.spec.containers[1].env.len(),
            1,
            "only DISABLE_ENVOY kept"
        );
        assert!(mesh_decision(&pod, &MeshProfile::istio(), &excluded()).is_redirect());
        // An app container named istio-init is an app (Istio's is an init container), and the
        // last of a duplicated variable is the one the proxy sees.
        let mut pod = mesh_pod();
        pod.spec.containers.push(Container {
            name: "istio-init".into(),
            ..Container::default()
        });
        pod.spec.containers[1].env = ["true", "false"]
            .map(|v| EnvVar {
                name: "DISABLE_ENVOY".into(),
                value: Some(v.into()),
            })
            .to_vec();
        assert!(mesh_decision(&pod, &MeshProfile::istio(), &excluded()).is_redirect());
    }

    #[test]
    fn native_sidecar_layout_is_redirected() {
        // Istio's current default: the proxy is the first init container, restartPolicy Always.
        let pod: PodInfo = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "shop",
                         "annotations": {"sidecar.istio.io/status": "{}"}},
            "spec": {"initContainers": [{"name": "istio-proxy", "restartPolicy": "Always"}],
                     "containers": [{"name": "app"}]}
        }))
        .expect("pod");
        assert!(mesh_decision(&pod, &MeshProfile::istio(), &excluded()).is_redirect());
    }

    #[test]
    fn label_true_overrides_annotation_false() {
        let mut pod = mesh_pod();
        pod.metadata
            .labels
            .insert("sidecar.istio.io/inject".into(), "true".into());
        pod.metadata
            .annotations
            .insert("sidecar.istio.io/inject".into(), "false".into());
        assert!(mesh_decision(&pod, &MeshProfile::istio(), &excluded()).is_redirect());
    }
}
