//! The kubelet path: containerd's CRI (Debian's containerd) creating pod sandboxes whose
//! network podwire-cni sets up, chained by the agent's real `install`
//! (`podwire_lab::cri::CriNode`, shared with `podwire demo --runtime containerd`).

use podwire_core::render::render;
use podwire_core::saved::parse_nat;
use podwire_core::{Family, MeshProfile, RedirectSpec};
use podwire_lab::cri::{CriNode, GATEWAY};
use podwire_lab::lab::{pod_manifest, APP_PORT};
use podwire_lab::probe::{self, connect};
use podwire_lab::require_root;
use serde_json::{json, Value};

fn native_sidecar_pod(namespace: &str, name: &str, uid: u32) -> Value {
    let mut pod = pod_manifest(namespace, name, true, &[]);
    pod["spec"] = json!({
        "initContainers": [{"name": "istio-proxy", "image": "proxy:1", "restartPolicy": "Always",
            "securityContext": {"runAsUser": uid, "runAsGroup": uid}}],
        "containers": [{"name": "app", "image": "app:1"}],
    });
    pod
}

#[test]
fn containerd_cri_sets_up_mesh_pods_through_podwire() {
    if !require_root() {
        return;
    }
    let mut node = CriNode::start().expect("containerd node");
    node.publish(&[
        pod_manifest("shop", "web", true, &[]),
        native_sidecar_pod("shop", "native", 2100),
        pod_manifest("shop", "plain", false, &[]),
    ])
    .expect("publish");
    probe::listen(&node.netns, &probe::any(false, APP_PORT), "NODE").expect("node server");
    let upstream = format!("{GATEWAY}:{APP_PORT}");
    let p = MeshProfile::istio();
    let want = render(&RedirectSpec::defaults(&p), &p, Family::V4);

    // A classic mesh pod: Istio's reference rules, outbound traffic reaches the proxy.
    let web = node.run_sandbox("shop", "web").expect("RunPodSandbox web");
    let (web_ip, web_ns) = node.sandbox(&web).expect("web status");
    assert!(web_ip.starts_with("198.18.4."), "{web_ip}");
    let saved = web_ns.nat_rules("iptables-save").expect("save");
    assert_eq!(
        parse_nat(&saved).missing(&want),
        Vec::<String>::new(),
        "{saved}"
    );
    probe::start_proxy(&web_ns, false).expect("proxy");
    let seen = connect(&web_ns, &upstream).expect("outbound");
    assert_eq!(
        (seen.label.as_str(), seen.orig.as_str()),
        ("PROXY-OUT", upstream.as_str())
    );

    // Istio's native-sidecar layout: redirected, the proxy's uid from the init container.
    let native = node
        .run_sandbox("shop", "native")
        .expect("RunPodSandbox native");
    let (_, native_ns) = node.sandbox(&native).expect("native status");
    let saved = native_ns.nat_rules("iptables-save").expect("save");
    assert!(saved.contains("-A OUTPUT -j ISTIO_OUTPUT"), "{saved}");
    assert!(saved.contains("--uid-owner 2100"), "{saved}");

    // A plain pod is left alone.
    let plain = node
        .run_sandbox("shop", "plain")
        .expect("RunPodSandbox plain");
    let (_, plain_ns) = node.sandbox(&plain).expect("plain status");
    let saved = plain_ns.nat_rules("iptables-save").expect("save");
    assert!(!saved.contains("ISTIO_"), "{saved}");
    let seen = connect(&plain_ns, &upstream).expect("plain outbound");
    assert_eq!(seen.label, "NODE");

    let mut uids = node.recorded_uids();
    uids.sort();
    assert_eq!(
        uids,
        ["uid-native", "uid-web"],
        "one record per redirected pod"
    );

    // Stop and Remove (containerd calls DEL, the second time without a netns): clean.
    for (id, ns) in [(web, web_ns), (native, native_ns), (plain, plain_ns)] {
        node.stop_and_remove(&id, ns).expect("stop and remove");
    }
    assert_eq!(node.recorded_uids(), Vec::<String>::new());
    let log = std::fs::read_to_string(node.path("podwire-cni.log")).unwrap_or_default();
    assert!(!log.contains("ERROR"), "{log}");

    // failurePolicy closed: with the agent down the sandbox is refused with code 11, and the
    // retry (kubelet's next attempt) succeeds once the agent is back.
    node.publish(&[pod_manifest("shop", "late", true, &[])])
        .expect("publish late");
    node.stop_agent();
    let err = node
        .run_sandbox("shop", "late")
        .expect_err("a pod whose mesh status is unknown must not start");
    assert!(
        err.message().contains("podwire-cni") && err.message().contains("try again later"),
        "{err:?}"
    );
    node.start_agent().expect("agent back");
    let late = node.run_sandbox("shop", "late").expect("retry succeeds");
    let (_, late_ns) = node.sandbox(&late).expect("late status");
    assert!(late_ns
        .nat_rules("iptables-save")
        .expect("save")
        .contains("-A OUTPUT -j ISTIO_OUTPUT"));
    node.stop_and_remove(&late, late_ns)
        .expect("stop and remove late");
}
