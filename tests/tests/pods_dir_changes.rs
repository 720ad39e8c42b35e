//! `podwire-agent serve` answers from its pods directory as it is, not as it was: a manifest
//! moved in a moment ago is found (not "not found" until the next reload), and a manifest
//! still being written is unknown (not read half-way, where it may parse as a pod without its
//! proxy). Either way podwire-cni, asking at once, redirects the pod or fails closed; it never
//! lets a mesh pod start unredirected.

use podwire_lab::chain::{pod_args, run_podwire, CniOutcome};
use podwire_lab::lab::{pod_manifest, Lab};
use podwire_lab::{require_root, Netns};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;

/// The agent's answer to the plugin's look-up of `default/name`, as JSON.
fn look_up(lab: &Lab, name: &str) -> Value {
    let mut s = UnixStream::connect(lab.socket()).expect("agent socket");
    writeln!(
        s,
        "{}",
        json!({"v": 1, "namespace": "default", "name": name})
    )
    .expect("write");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("read");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("answer {line:?}: {e}"))
}

fn add(lab: &Lab, ns: &Netns, name: &str) -> CniOutcome {
    let conf = json!({
        "cniVersion": "1.0.0", "name": "pods-dir", "type": "podwire-cni",
        "agentSocket": lab.socket().display().to_string(),
        "stateDir": lab.dir.join("state").display().to_string(),
        "logLevel": "warn",
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "198.18.0.9/24"}]},
    });
    run_podwire(
        "ADD",
        &ns.name,
        &ns.path(),
        &pod_args("default", name),
        conf.to_string().as_bytes(),
    )
    .expect("exec podwire-cni")
}

fn redirected(ns: &Netns) -> bool {
    ns.nat_rules("iptables-save")
        .expect("save")
        .contains("-A OUTPUT -j ISTIO_OUTPUT")
}

#[test]
fn a_manifest_moved_in_is_found_at_once() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(false, json!({})).expect("lab");
    // Several times over: each ADD follows its rename at once, inside the reload's 100 ms
    // quiet period, when the set the agent holds does not have the pod yet.
    for i in 0..5 {
        let name = format!("fresh{i}");
        // Everything but the rename first, so that nothing but the ADD follows it.
        let ns = Netns::new("f").expect("netns");
        let tmp = lab.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, pod_manifest("default", &name, true, &[]).to_string()).expect("write");
        std::fs::rename(&tmp, lab.dir.join("pods").join(format!("{name}.json"))).expect("mv");
        let out = add(&lab, &ns, &name);
        assert!(out.ok, "{name}: {out:?}");
        assert!(redirected(&ns), "{name}: a mesh pod started unredirected");
    }
}

#[test]
fn a_manifest_being_written_is_unknown_until_closed() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(false, json!({})).expect("lab");
    let status = r#"{"containers":["istio-proxy"]}"#;
    // The first part is a whole pod on its own, without its proxy.
    let head = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: slow\n  namespace: default\n  uid: uid-slow\n  \
         annotations:\n    sidecar.istio.io/status: '{status}'\nspec:\n  containers:\n  - name: app\n    image: app:1\n"
    );
    let tail =
        "  - name: istio-proxy\n    image: proxy:1\n    securityContext: {runAsUser: 1337}\n";
    let mut file = std::fs::File::create(lab.dir.join("pods/slow.yaml")).expect("create");
    file.write_all(head.as_bytes()).expect("write head");
    // The look-up waits for the agent to read the directory again, then cannot say: the pod
    // is in a file still open for writing.
    let answer = look_up(&lab, "slow");
    assert_eq!(answer["status"], "notReady", "{answer}");
    let why = answer["message"].as_str().unwrap_or_default();
    assert!(
        why.contains("slow.yaml") && why.contains("being written"),
        "{answer}"
    );
    let ns = Netns::new("s").expect("netns");
    let out = add(&lab, &ns, "slow");
    assert!(
        !out.ok,
        "ADD must fail closed while the manifest is half-written: {out:?}"
    );
    assert!(
        !redirected(&ns)
            && !ns
                .nat_rules("iptables-save")
                .expect("save")
                .contains("ISTIO")
    );
    // Closed: the whole pod, proxy and all, at once.
    file.write_all(tail.as_bytes()).expect("write tail");
    drop(file);
    let out = add(&lab, &ns, "slow");
    assert!(out.ok, "{out:?}");
    assert!(redirected(&ns), "the pod was read without its proxy");
}

#[test]
fn a_linked_manifest_is_read_at_once_and_blocks_nothing() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(false, json!({})).expect("lab");
    // `ln` makes a file no write ever closes: it is whole from the start, and must not count
    // as being written (which would hold every look-up of the node as unknown).
    let elsewhere = lab.dir.join("linked.json");
    std::fs::write(
        &elsewhere,
        pod_manifest("default", "linked", true, &[]).to_string(),
    )
    .expect("write");
    let ns = Netns::new("l").expect("netns");
    std::os::unix::fs::symlink(&elsewhere, lab.dir.join("pods/linked.json")).expect("ln -s");
    let out = add(&lab, &ns, "linked");
    assert!(out.ok, "{out:?}");
    assert!(redirected(&ns));
    std::fs::hard_link(&elsewhere, lab.dir.join("pods/hard.json")).expect("ln");
    let answer = look_up(&lab, "nobody");
    assert_eq!(answer["status"], "notFound", "{answer}");
}

#[test]
fn a_replaced_directory_fails_closed_saying_so() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(false, json!({})).expect("lab");
    let pods = lab.dir.join("pods");
    std::fs::remove_dir_all(&pods).expect("rm -r");
    std::fs::create_dir(&pods).expect("mkdir");
    std::fs::write(
        pods.join("web.json"),
        pod_manifest("default", "web", true, &[]).to_string(),
    )
    .expect("write");
    // The agent watches a directory that is gone: no answer from it is current any more.
    let answer = look_up(&lab, "web");
    assert_eq!(answer["status"], "notReady", "{answer}");
    let why = answer["message"].as_str().unwrap_or_default();
    assert!(
        why.contains("removed or replaced") && why.contains("restart"),
        "{answer}"
    );
    let ns = Netns::new("r").expect("netns");
    let out = add(&lab, &ns, "web");
    assert!(!out.ok, "{out:?}");
}
