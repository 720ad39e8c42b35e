//! Issue 10: on an nft node the plugin programs nf_tables in-process over netlink; what it
//! writes must read back through `iptables-save` exactly as what `iptables-nft-restore` writes,
//! so CHECK, DEL, ADD again and operators' runbooks keep working, and traffic is redirected.
//! Real chain (bridge + host-local, then podwire-cni), real netns. Needs root; fails (never
//! skips) under CI=true.

use podwire_core::render::render;
use podwire_core::{Family, MeshProfile, PodInfo, RedirectSpec};
use podwire_lab::chain::run_podwire;
use podwire_lab::lab::{pod_manifest, Lab, APP_PORT, NODE_V4, NODE_V6};
use podwire_lab::probe::{self, connect};
use podwire_lab::{require_root, Netns};
use serde_json::json;
use std::process::Command;

/// `iptables-save -t nat` without comment lines and chain counters.
fn normalized(ns: &Netns, family: Family) -> String {
    let bin = match family {
        Family::V4 => "iptables-nft-save",
        Family::V6 => "ip6tables-nft-save",
    };
    let out = ns
        .output(Command::new(bin).args(["-t", "nat"]))
        .expect("iptables-save");
    assert!(out.status.success(), "{bin}: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.split_once(' ') {
            Some((chain, _)) if l.starts_with(':') => chain.to_string(),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// What the exec path writes for `rules` in a fresh netns.
fn restored(rules: &str, family: Family) -> String {
    let ns = Netns::new("ref").expect("netns");
    let bin = match family {
        Family::V4 => "iptables-nft-restore",
        Family::V6 => "ip6tables-nft-restore",
    };
    let file = std::env::temp_dir().join(format!("podwire-netlink-{}.rules", ns.name));
    std::fs::write(&file, rules).expect("rules file");
    let out = ns
        .output(
            Command::new("sh")
                .arg("-c")
                .arg(format!("{bin} --noflush < {}", file.display())),
        )
        .expect("restore");
    let _ = std::fs::remove_file(&file);
    assert!(out.status.success(), "{bin}: {out:?}");
    normalized(&ns, family)
}

#[test]
fn add_over_netlink_reads_back_like_iptables_restore_and_check_del_work() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(true, json!({"logLevel": "info", "iptables": "nft"})).expect("lab");
    const T: &str = "traffic.sidecar.istio.io/";
    let (ifaces, ranges, ports) = (
        format!("{T}excludeInterfaces"),
        format!("{T}excludeOutboundIPRanges"),
        format!("{T}excludeOutboundPorts"),
    );
    let annotated = [
        (ifaces.as_str(), "eth9,net+"),
        (ranges.as_str(), "169.254.0.0/16,fd00::/12"),
        (ports.as_str(), "5432"),
    ];
    let manifests = [
        pod_manifest("shop", "web", true, &[]),
        pod_manifest("shop", "tuned", true, &annotated),
    ];
    lab.publish("shop.yaml", &manifests).expect("publish");
    let profile = MeshProfile::istio();
    let reference = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../core/tests/golden/reference-istio-sidecar-cni-default.rules"),
    )
    .expect("reference rules");

    for (name, manifest) in [("web", &manifests[0]), ("tuned", &manifests[1])] {
        let pod = lab.start_pod("shop", name).expect("ADD");
        let info: PodInfo = serde_json::from_value(manifest.clone()).expect("pod");
        let spec = RedirectSpec::from_pod(&info, &profile).expect("spec");
        for family in [Family::V4, Family::V6] {
            let want = render(&spec, &profile, family).to_restore_input();
            let got = normalized(&pod.netns, family);
            assert_eq!(
                got,
                restored(&want, family),
                "{name} {family:?}: netlink-written rules read back differently"
            );
            if name == "web" && family == Family::V4 {
                assert_eq!(got, restored(&reference, family), "the Istio reference");
            }
        }
        let log = lab.plugin_log();
        assert!(
            log.contains("applied=[New(Netlink), New(Netlink)]"),
            "{name}: ADD did not take the netlink path for both families:\n{log}"
        );

        // Traffic is redirected, both families.
        probe::start_proxy(&pod.netns, true).expect("proxy");
        let out4 = connect(&pod.netns, &format!("{NODE_V4}:{APP_PORT}")).expect("v4");
        assert_eq!(out4.label, "PROXY-OUT", "{name}: {out4:?}");
        let out6 = connect(&pod.netns, &format!("[{NODE_V6}]:{APP_PORT}")).expect("v6");
        assert_eq!(out6.label, "PROXY-OUT", "{name}: {out6:?}");

        // CHECK passes on netlink-written rules; ADD again is a no-op; DEL removes them.
        for (plugin, out) in lab.run("CHECK", &pod).expect("CHECK") {
            assert!(out.ok, "CHECK failed in {plugin}: {out:?}");
        }
        let before = normalized(&pod.netns, Family::V4);
        let mut entry = lab.chain.conflist["plugins"]
            .as_array()
            .and_then(|p| p.last())
            .cloned()
            .expect("podwire entry");
        entry["name"] = lab.chain.conflist["name"].clone();
        entry["cniVersion"] = lab.chain.conflist["cniVersion"].clone();
        entry["prevResult"] = pod.result.clone();
        let (cid, path, args) = lab.attachment(&pod.netns, "shop", name);
        let again = run_podwire("ADD", &cid, &path, &args, entry.to_string().as_bytes())
            .expect("ADD again");
        assert!(again.ok, "ADD again: {again:?}");
        assert_eq!(
            normalized(&pod.netns, Family::V4),
            before,
            "ADD again changed the rules"
        );
        assert!(
            lab.plugin_log()
                .contains("applied=[AlreadyPresent, AlreadyPresent]"),
            "{}",
            lab.plugin_log()
        );
        for (plugin, out) in lab.run("DEL", &pod).expect("DEL") {
            assert!(out.ok, "DEL failed in {plugin}: {out:?}");
        }
        for family in [Family::V4, Family::V6] {
            let left = normalized(&pod.netns, family);
            assert!(
                !left.contains("ISTIO"),
                "{name} {family:?}: DEL left\n{left}"
            );
        }
    }
}
