//! Pods as podwire's injector leaves them (the webhook's own decision and patch, from
//! `podwire_core::inject`), for end-to-end tests that start them through the agent and
//! podwire-cni: a test of the redirection then runs on the very pod the webhook would admit.

use crate::lab::pod_manifest;
use podwire_core::inject::{apply_patch, plan, InjectorConfig};
use podwire_core::MeshProfile;
use serde_json::{json, Value};

/// The status port [`injected_pod`] gives the proxy (Istio's default is 15020).
pub const STATUS_PORT: u16 = 15030;

/// Whether `saved` (iptables-save) exempts inbound `port` (a RETURN in ISTIO_INBOUND).
pub fn inbound_exempt(saved: &str, port: u16) -> bool {
    let ret = format!("--dport {port} -j RETURN");
    saved
        .lines()
        .any(|l| l.starts_with("-A ISTIO_INBOUND ") && l.ends_with(&ret))
}

/// `pod` as podwire's injector (the webhook's decision and patch) leaves it.
pub fn inject(pod: &mut Value) {
    let p = plan(
        pod,
        None,
        None,
        &InjectorConfig::default(),
        &MeshProfile::istio(),
    )
    .expect("readable pod");
    assert!(p.decision.inject, "{}", p.decision.reason);
    apply_patch(pod, &p.patch.expect("accepted")).expect("the patch applies");
}

/// An app pod as its author writes it, customising the proxy's identity, then injected by
/// podwire (the webhook's decision and patch) in the layout `native` asks for.
pub fn injected_pod(namespace: &str, name: &str, uid: u32, native: bool) -> Value {
    let mut pod = pod_manifest(namespace, name, false, &[]);
    pod["metadata"]["annotations"]["sidecar.istio.io/nativeSidecar"] = json!(native.to_string());
    // pilot-agent's status port moved off the default, so that the inbound exclusion Istio's
    // template derives from it (`traffic.sidecar.istio.io/excludeInboundPorts`) is a port no
    // default exempts: rules exempting it come from the injected annotation.
    pod["metadata"]["annotations"]["status.sidecar.istio.io/port"] = json!(STATUS_PORT.to_string());
    pod["spec"]["containers"]
        .as_array_mut()
        .expect("containers")
        .push(json!({"name": "istio-proxy", "image": "auto",
            "securityContext": {"runAsUser": uid, "runAsGroup": uid}}));
    inject(&mut pod);
    let (list, other) = if native {
        ("initContainers", "containers")
    } else {
        ("containers", "initContainers")
    };
    let proxies: Vec<&Value> = pod["spec"][list]
        .as_array()
        .expect("list")
        .iter()
        .filter(|c| c["name"] == "istio-proxy")
        .collect();
    assert_eq!(proxies.len(), 1, "one proxy in {list}: {pod}");
    let proxy = proxies[0];
    assert_ne!(proxy["image"], json!("auto"), "image: auto resolves");
    assert_eq!(
        pod["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeInboundPorts"],
        json!(STATUS_PORT.to_string()),
        "the template excludes the status port inbound"
    );
    assert_eq!(proxy["securityContext"]["runAsUser"], json!(uid));
    assert_eq!(proxy["args"][0], json!("proxy"));
    assert_eq!(
        proxy.get("restartPolicy").is_some(),
        native,
        "restartPolicy: Always only in the native layout"
    );
    assert!(pod["spec"][other]
        .as_array()
        .is_none_or(|l| l.iter().all(|c| c["name"] != "istio-proxy")));
    pod
}

/// `pod` injected by podwire with Istio's `template`.
pub fn injected_with(mut pod: Value, template: &str) -> Value {
    pod["metadata"]["annotations"]["inject.istio.io/templates"] = json!(template);
    pod["metadata"]["labels"] = json!({"sidecar.istio.io/inject": "true"});
    inject(&mut pod);
    assert!(pod["metadata"]["annotations"]
        .get("sidecar.istio.io/status")
        .is_some());
    pod
}
