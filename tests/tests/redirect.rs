//! Real traffic through real rules: pods in network namespaces wired by Debian's bridge +
//! host-local, then podwire-cni, exactly as a runtime calls them; a probe proxy on
//! 15001/15006 reports SO_ORIGINAL_DST. Needs root; fails (never skips) under CI=true.

use podwire_core::render::render;
use podwire_core::saved::parse_nat;
use podwire_core::{Family, MeshProfile, RedirectSpec};
use podwire_lab::lab::{pod_manifest, Lab, APP_PORT, NODE_V4, NODE_V6};
use podwire_lab::probe::{self, connect};
use podwire_lab::require_root;
use serde_json::json;

fn node4() -> String {
    format!("{NODE_V4}:{APP_PORT}")
}

#[test]
fn mesh_pod_is_redirected_and_plain_pod_is_untouched() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(false, json!({})).expect("lab");
    lab.publish(
        "shop.yaml",
        &[
            pod_manifest("shop", "web", true, &[]),
            pod_manifest("shop", "plain", false, &[]),
        ],
    )
    .expect("publish");
    let mesh = lab.start_pod("shop", "web").expect("mesh pod");
    let plain = lab.start_pod("shop", "plain").expect("plain pod");
    probe::start_proxy(&mesh.netns, false).expect("proxy");
    probe::start_proxy(&plain.netns, false).expect("proxy in plain pod (must stay unused)");

    // Outbound from the mesh pod lands on 15001 with its original destination.
    let seen = connect(&mesh.netns, &node4()).expect("mesh outbound");
    assert_eq!(seen.label, "PROXY-OUT", "{seen:?}");
    assert_eq!(seen.orig, node4());
    // Inbound to the mesh pod's app port lands on 15006.
    let target = format!("{}:{APP_PORT}", mesh.ip4);
    let seen = connect(&lab.node, &target).expect("mesh inbound");
    assert_eq!(
        (seen.label.as_str(), seen.orig.as_str()),
        ("PROXY-IN", target.as_str())
    );
    // The plain pod talks to the node and is reached directly.
    let seen = connect(&plain.netns, &node4()).expect("plain outbound");
    assert_eq!((seen.label.as_str(), seen.orig.as_str()), ("NODE", "-"));
    let seen = connect(&lab.node, &format!("{}:{APP_PORT}", plain.ip4)).expect("plain inbound");
    assert_eq!(seen.label, "APP");

    // The mesh pod holds exactly Istio's default rules; the plain pod none.
    let p = MeshProfile::istio();
    let want = render(&RedirectSpec::defaults(&p), &p, Family::V4);
    let saved = mesh.netns.nat_rules("iptables-save").expect("save");
    assert_eq!(
        parse_nat(&saved).missing(&want),
        Vec::<String>::new(),
        "{saved}"
    );
    let saved = plain.netns.nat_rules("iptables-save").expect("save");
    assert!(!saved.contains("ISTIO_"), "plain pod was touched:\n{saved}");

    for pod in [&mesh, &plain] {
        for (plugin, out) in lab.run("DEL", pod).expect("DEL") {
            assert!(out.ok, "DEL failed in {plugin}: {out:?}");
        }
    }
    assert!(!mesh
        .netns
        .nat_rules("iptables-save")
        .expect("save")
        .contains("ISTIO_"));
}

#[test]
fn proxy_uid_bypasses_and_other_uids_do_not() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(false, json!({})).expect("lab");
    lab.publish("p.yaml", &[pod_manifest("default", "uidpod", true, &[])])
        .expect("publish");
    let pod = lab.start_pod("default", "uidpod").expect("pod");
    probe::start_proxy(&pod.netns, false).expect("proxy");
    let as_uid =
        |uid: u32| probe::connect_as(&pod.netns, uid, NODE_V4, APP_PORT).expect("connect as uid");

    assert_eq!(
        as_uid(1337).label,
        "NODE",
        "the proxy's own traffic must not loop back into it"
    );
    assert_eq!(
        as_uid(1000).label,
        "PROXY-OUT",
        "an app uid must be redirected"
    );
}

#[test]
fn traffic_annotations_are_honoured() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(false, json!({})).expect("lab");
    let t = |k: &str| format!("traffic.sidecar.istio.io/{k}");
    let cases = [
        (
            "ex-out-port",
            t("excludeOutboundPorts"),
            "8080",
            "NODE",
            "PROXY-IN",
        ),
        (
            "ex-out-range",
            t("excludeOutboundIPRanges"),
            "198.18.0.1/32",
            "NODE",
            "PROXY-IN",
        ),
        (
            "in-out-range",
            t("includeOutboundIPRanges"),
            "198.19.0.0/16",
            "NODE",
            "PROXY-IN",
        ),
        (
            "in-out-only",
            t("includeOutboundIPRanges"),
            "198.18.0.0/24",
            "PROXY-OUT",
            "PROXY-IN",
        ),
        (
            "ex-in-port",
            t("excludeInboundPorts"),
            "8080",
            "PROXY-OUT",
            "APP",
        ),
        (
            "in-in-ports",
            t("includeInboundPorts"),
            "9999",
            "PROXY-OUT",
            "APP",
        ),
        ("ex-iface", t("excludeInterfaces"), "eth0", "NODE", "APP"),
    ];
    let manifests: Vec<_> = cases
        .iter()
        .map(|(name, key, value, ..)| pod_manifest("default", name, true, &[(key.as_str(), value)]))
        .collect();
    lab.publish("annotated.yaml", &manifests).expect("publish");
    for (name, key, value, outbound, inbound) in cases {
        let pod = lab.start_pod("default", name).expect("pod");
        probe::start_proxy(&pod.netns, false).expect("proxy");
        let out = connect(&pod.netns, &node4()).expect("outbound");
        assert_eq!(out.label, outbound, "{key}={value}: outbound {out:?}");
        let inb = connect(&lab.node, &format!("{}:{APP_PORT}", pod.ip4)).expect("inbound");
        assert_eq!(inb.label, inbound, "{key}={value}: inbound {inb:?}");
    }
}

#[test]
fn ipv6_gets_the_same_redirection() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(true, json!({})).expect("lab");
    lab.publish("v6.yaml", &[pod_manifest("default", "v6pod", true, &[])])
        .expect("publish");
    let pod = lab.start_pod("default", "v6pod").expect("pod");
    probe::start_proxy(&pod.netns, true).expect("proxy");
    let ip6 = pod.ip6.clone().expect("pod has an IPv6 address");
    let dst = format!("[{NODE_V6}]:{APP_PORT}");
    let seen = connect(&pod.netns, &dst).expect("v6 outbound");
    assert_eq!(
        (seen.label.as_str(), seen.orig.as_str()),
        ("PROXY-OUT", dst.as_str())
    );
    let target = format!("[{ip6}]:{APP_PORT}");
    let seen = connect(&lab.node, &target).expect("v6 inbound");
    assert_eq!(
        (seen.label.as_str(), seen.orig.as_str()),
        ("PROXY-IN", target.as_str())
    );
    // IPv4 still redirected in the dual-stack pod.
    assert_eq!(
        connect(&pod.netns, &node4()).expect("v4").label,
        "PROXY-OUT"
    );
    let p = MeshProfile::istio();
    let want = render(&RedirectSpec::defaults(&p), &p, Family::V6);
    let saved = pod.netns.nat_rules("ip6tables-save").expect("save");
    assert_eq!(
        parse_nat(&saved).missing(&want),
        Vec::<String>::new(),
        "{saved}"
    );
}
