//! The kubelet path: containerd's CRI (Debian's containerd) creating pod sandboxes whose
//! network podwire-cni sets up, chained by the agent's real `install`
//! (`podwire_lab::cri::CriNode`, shared with `podwire demo --runtime containerd`).
//!
//! The mesh pods besides the reference one come from podwire's own injector (the webhook's
//! decision and patch): Istio's sidecar in the native layout and in the classic one, each
//! with the proxy's uid customised the Istio way, and a proxyless gRPC pod (`grpc-agent`)
//! that podwire-cni must leave alone.

use podwire_core::render::render;
use podwire_core::saved::parse_nat;
use podwire_core::{Family, MeshProfile, RedirectSpec};
use podwire_lab::cri::{CriNode, GATEWAY};
use podwire_lab::injected::{inbound_exempt, injected_pod, injected_with, STATUS_PORT};
use podwire_lab::lab::{pod_manifest, APP_PORT};
use podwire_lab::probe::{self, connect};
use podwire_lab::require_root;

#[test]
fn containerd_cri_sets_up_mesh_pods_through_podwire() {
    if !require_root() {
        return;
    }
    let mut node = CriNode::start().expect("containerd node");
    node.publish(&[
        pod_manifest("shop", "web", true, &[]),
        injected_pod("shop", "native", 2100, true),
        injected_pod("shop", "classic", 2200, false),
        injected_with(pod_manifest("shop", "proxyless", false, &[]), "grpc-agent"),
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

    // Istio's sidecar as podwire injects it, in both layouts: redirected, the proxy's uid
    // from the pod's own override (read from the init container in the native layout), the
    // status port Istio's template excludes (moved off the default) left alone inbound.
    let mut started = vec![(web, web_ns)];
    for (name, uid) in [("native", 2100), ("classic", 2200)] {
        let id = node
            .run_sandbox("shop", name)
            .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e:?}"));
        let (_, ns) = node.sandbox(&id).expect("status");
        let saved = ns.nat_rules("iptables-save").expect("save");
        assert!(
            saved.contains("-A OUTPUT -j ISTIO_OUTPUT"),
            "{name}: {saved}"
        );
        assert!(
            saved.contains(&format!("--uid-owner {uid}")),
            "{name}: {saved}"
        );
        assert!(inbound_exempt(&saved, STATUS_PORT), "{name}: {saved}");
        probe::start_proxy(&ns, false).expect("proxy");
        let seen = connect(&ns, &upstream).expect("outbound");
        assert_eq!(
            (seen.label.as_str(), seen.orig.as_str()),
            ("PROXY-OUT", upstream.as_str()),
            "{name}: outbound reaches the proxy"
        );
        for (as_uid, want) in [(uid, "NODE"), (1337, "PROXY-OUT")] {
            let seen = probe::connect_as(&ns, as_uid, GATEWAY, APP_PORT).expect("connect as");
            assert_eq!(seen.label, want, "{name}: traffic of uid {as_uid}");
        }
        started.push((id, ns));
    }

    // Left alone: a plain pod, and a proxyless gRPC pod (no Envoy listens on 15001/15006).
    for name in ["plain", "proxyless"] {
        let id = node
            .run_sandbox("shop", name)
            .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e:?}"));
        let (_, ns) = node.sandbox(&id).expect("status");
        let saved = ns.nat_rules("iptables-save").expect("save");
        assert!(!saved.contains("ISTIO_"), "{name}: {saved}");
        let seen = connect(&ns, &upstream).expect("outbound");
        assert_eq!(seen.label, "NODE", "{name}");
        started.push((id, ns));
    }

    let mut uids = node.recorded_uids();
    uids.sort();
    assert_eq!(
        uids,
        ["uid-classic", "uid-native", "uid-web"],
        "one record per redirected pod"
    );

    // Stop and Remove (containerd calls DEL, the second time without a netns): clean.
    for (id, ns) in started {
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
