//! A full node: 110 pods ADDed at the same moment all succeed, with no xtables lock errors.

use podwire_lab::bins::workspace_bin;
use podwire_lab::chain::{cni_env, exec_plugin, pod_args};
use podwire_lab::lab::{pod_manifest, Lab};
use podwire_lab::{require_root, Netns};
use serde_json::json;
use std::sync::Barrier;

const PODS: usize = 110;

#[test]
fn a_full_node_of_concurrent_adds_succeeds() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(false, json!({})).expect("lab");
    let manifests: Vec<_> = (0..PODS)
        .map(|i| pod_manifest("default", &format!("scale-{i}"), true, &[]))
        .collect();
    lab.publish("scale.yaml", &manifests).expect("publish");
    let namespaces: Vec<Netns> = (0..PODS).map(|_| Netns::new("s").expect("netns")).collect();
    let conf = json!({"cniVersion": "1.0.0", "name": "scale", "type": "podwire-cni",
        "agentSocket": lab.socket().display().to_string(),
        "stateDir": lab.dir.join("state").display().to_string(), "logLevel": "warn",
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "198.18.0.2/24"}]}})
    .to_string();
    let plugin = workspace_bin("podwire-cni");
    let barrier = Barrier::new(PODS);
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = namespaces
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let (barrier, plugin, conf) = (&barrier, &plugin, &conf);
                s.spawn(move || {
                    let env = cni_env(
                        "ADD",
                        &format!("scale{i}"),
                        &ns.path(),
                        &pod_args("default", &format!("scale-{i}")),
                    );
                    barrier.wait();
                    let out = exec_plugin(plugin, &env, conf.as_bytes()).expect("exec");
                    (!out.ok).then(|| format!("pod {i}: {} {}", out.stdout, out.stderr))
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().expect("thread"))
            .collect()
    });
    assert!(
        failures.is_empty(),
        "{} of {PODS} ADDs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    for ns in &namespaces {
        assert!(
            ns.nat_rules("iptables-save")
                .expect("save")
                .contains("-A OUTPUT -j ISTIO_OUTPUT"),
            "{} lacks rules",
            ns.name
        );
    }
}
