//! Istio's current default layout: `istio-proxy` is a native sidecar (the first init container,
//! `restartPolicy: Always`). Such a pod must be redirected exactly like a classic one, with the
//! proxy's uid/gid read from that init container. Real netns, real rules, real traffic.
//!
//! The pods of the last test come from podwire's own injector (the webhook's decision and
//! patch), in both layouts, with the proxy's uid customised the Istio way (the pod declares
//! its own `istio-proxy` with `image: auto` and a `runAsUser`).

use podwire_lab::injected::{inbound_exempt, injected_pod, injected_with, STATUS_PORT};
use podwire_lab::lab::{pod_manifest, Lab, APP_PORT, NODE_V4};
use podwire_lab::probe::{self, connect};
use podwire_lab::require_root;
use serde_json::json;

/// A mesh pod in the native-sidecar layout, proxy running as `uid`.
fn native_sidecar_pod(namespace: &str, name: &str, uid: u32) -> serde_json::Value {
    let mut pod = pod_manifest(namespace, name, true, &[]);
    pod["spec"] = json!({
        "initContainers": [{"name": "istio-proxy", "image": "proxy:1", "restartPolicy": "Always",
            "securityContext": {"runAsUser": uid, "runAsGroup": uid}}],
        "containers": [{"name": "app", "image": "app:1"}],
    });
    pod
}

fn nc_as(pod: &podwire_lab::lab::Pod, uid: u32) -> String {
    probe::connect_as(&pod.netns, uid, NODE_V4, APP_PORT)
        .expect("connect as uid")
        .label
}

#[test]
fn native_sidecar_pod_is_redirected_with_its_init_containers_identity() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(false, json!({})).expect("lab");
    lab.publish("native.yaml", &[native_sidecar_pod("shop", "native", 2100)])
        .expect("publish");
    let pod = lab.start_pod("shop", "native").expect("native-sidecar pod");
    probe::start_proxy(&pod.netns, false).expect("proxy");

    let node = format!("{NODE_V4}:{APP_PORT}");
    let seen = connect(&pod.netns, &node).expect("outbound");
    assert_eq!(
        (seen.label.as_str(), seen.orig.as_str()),
        ("PROXY-OUT", node.as_str()),
        "outbound traffic of a native-sidecar pod must reach the proxy"
    );
    let target = format!("{}:{APP_PORT}", pod.ip4);
    let seen = connect(&lab.node, &target).expect("inbound");
    assert_eq!(
        (seen.label.as_str(), seen.orig.as_str()),
        ("PROXY-IN", target.as_str())
    );
    // The exemption follows the init container's runAsUser, not the default 1337.
    assert_eq!(nc_as(&pod, 2100), "NODE", "the proxy's own uid bypasses");
    assert_eq!(nc_as(&pod, 1337), "PROXY-OUT", "1337 is an app uid here");
    let saved = pod.netns.nat_rules("iptables-save").expect("save");
    assert!(saved.contains("--uid-owner 2100"), "{saved}");

    for (plugin, out) in lab.run("CHECK", &pod).expect("CHECK") {
        assert!(out.ok, "CHECK failed in {plugin}: {out:?}");
    }
    for (plugin, out) in lab.run("DEL", &pod).expect("DEL") {
        assert!(out.ok, "DEL failed in {plugin}: {out:?}");
    }
    assert!(!pod
        .netns
        .nat_rules("iptables-save")
        .expect("save")
        .contains("ISTIO_"));
}

#[test]
fn pods_injected_by_podwire_are_redirected_in_both_layouts() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(false, json!({})).expect("lab");
    lab.publish(
        "injected.yaml",
        &[
            injected_pod("shop", "native-injected", 2100, true),
            injected_pod("shop", "classic-injected", 2200, false),
        ],
    )
    .expect("publish");
    for (name, uid) in [("native-injected", 2100), ("classic-injected", 2200)] {
        let pod = lab.start_pod("shop", name).expect(name);
        probe::start_proxy(&pod.netns, false).expect("proxy");
        let node = format!("{NODE_V4}:{APP_PORT}");
        let seen = connect(&pod.netns, &node).expect("outbound");
        assert_eq!(
            (seen.label.as_str(), seen.orig.as_str()),
            ("PROXY-OUT", node.as_str()),
            "{name}: outbound traffic must reach the proxy"
        );
        let target = format!("{}:{APP_PORT}", pod.ip4);
        let seen = connect(&lab.node, &target).expect("inbound");
        assert_eq!(
            (seen.label.as_str(), seen.orig.as_str()),
            ("PROXY-IN", target.as_str()),
            "{name}: inbound"
        );
        // The status port Istio's template excludes (moved to STATUS_PORT, which no default
        // exempts) is exempt inbound, and the proxy's own uid (from the pod's override)
        // bypasses.
        let saved = pod.netns.nat_rules("iptables-save").expect("save");
        assert!(inbound_exempt(&saved, STATUS_PORT), "{name}: {saved}");
        assert!(
            saved.contains(&format!("--uid-owner {uid}")),
            "{name}: {saved}"
        );
        assert_eq!(
            nc_as(&pod, uid),
            "NODE",
            "{name}: the proxy's own uid bypasses"
        );
        assert_eq!(
            nc_as(&pod, 1337),
            "PROXY-OUT",
            "{name}: 1337 is an app uid here"
        );
        for (plugin, out) in lab.run("DEL", &pod).expect("DEL") {
            assert!(out.ok, "{name}: DEL failed in {plugin}: {out:?}");
        }
    }
}

/// What istio-cni leaves alone, podwire-cni leaves alone, in a real netns with real traffic:
/// a gateway podwire injected with Istio's `gateway` template (its proxy *is* the pod's
/// server: redirecting it would loop its traffic into itself), a pod Istio's own injector
/// gave `istio-init` (that container programs the rules; a second set would make it fail),
/// and a proxyless gRPC pod podwire injected with Istio's `grpc-agent` template
/// (`DISABLE_ENVOY=true`: nothing listens on 15001/15006).
#[test]
fn gateways_proxyless_and_istio_init_pods_are_left_alone() {
    if !require_root() {
        return;
    }
    let mut gateway = pod_manifest("shop", "gateway", false, &[]);
    gateway["spec"]["containers"] = json!([{"name": "istio-proxy", "image": "auto"}]);
    let gateway = injected_with(gateway, "gateway");
    let proxy = &gateway["spec"]["containers"][0];
    assert_eq!(proxy["args"][1], json!("router"), "{gateway}");

    let mut istio_init = pod_manifest("shop", "istio-init", true, &[]);
    istio_init["spec"]["initContainers"] = json!([{"name": "istio-init", "image": "proxyv2"}]);
    let proxyless = injected_with(pod_manifest("shop", "proxyless", false, &[]), "grpc-agent");
    assert!(
        proxyless["spec"]["initContainers"].is_null(),
        "never native: {proxyless}"
    );

    // At info, the plugin logs each pass-through and why.
    let lab = Lab::new(false, json!({"logLevel": "info"})).expect("lab");
    lab.publish("alone.yaml", &[gateway, istio_init, proxyless])
        .expect("publish");
    for (name, why) in [
        ("gateway", "runs as `proxy router`"),
        ("istio-init", "istio-init init container"),
        ("proxyless", "DISABLE_ENVOY=true"),
    ] {
        let pod = lab.start_pod("shop", name).expect(name);
        let node = format!("{NODE_V4}:{APP_PORT}");
        let seen = connect(&pod.netns, &node).expect("outbound");
        assert_eq!(
            (seen.label.as_str(), seen.orig.as_str()),
            ("NODE", "-"),
            "{name}: outbound goes straight to the node"
        );
        let seen = connect(&lab.node, &format!("{}:{APP_PORT}", pod.ip4)).expect("inbound");
        assert_eq!(seen.label, "APP", "{name}: inbound reaches the pod itself");
        let saved = pod.netns.nat_rules("iptables-save").expect("save");
        assert!(!saved.contains("ISTIO_"), "{name}: {saved}");
        let log = lab.plugin_log();
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("shop/{name}")) && l.contains(why)),
            "{name}: the plugin's log says why: {log}"
        );
        for (plugin, out) in lab.run("DEL", &pod).expect("DEL") {
            assert!(out.ok, "{name}: DEL failed in {plugin}: {out:?}");
        }
    }
}
