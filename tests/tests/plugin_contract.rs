//! The plugin's contract with the runtime: errors as CNI error JSON with the spec's codes and a
//! message naming the field, nothing left behind on failure, idempotent ADD, DEL that succeeds
//! when the netns is gone, CHECK that notices missing rules, VERSION/STATUS/GC.

use podwire_lab::bins::workspace_bin;
use podwire_lab::chain::{exec_plugin, pod_args, run_podwire, CniOutcome};
use podwire_lab::lab::{pod_manifest, Lab};
use podwire_lab::{require_root, Netns};
use serde_json::{json, Value};

const PREV: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"x"}],"ips":[{"address":"198.18.0.9/24","interface":0}],"dns":{},"custom":{"kept":[1,2.50]}}"#;

fn conf(lab: &Lab, extra: Value) -> String {
    conf_prev(lab, extra, PREV)
}

/// [`conf`] with `prev` as the previous plugin's result.
fn conf_prev(lab: &Lab, extra: Value, prev: &str) -> String {
    let mut c = json!({
        "cniVersion": "1.0.0", "name": "contract", "type": "podwire-cni",
        "agentSocket": lab.socket().display().to_string(),
        "stateDir": lab.dir.join("state").display().to_string(),
        "logLevel": "warn",
    });
    if let (Some(o), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    let mut s = c.to_string();
    s.truncate(s.len() - 1);
    format!("{s},\"prevResult\":{prev}}}")
}

fn run(command: &str, netns: &str, pod: &str, stdin: &str) -> CniOutcome {
    run_podwire(
        command,
        &format!("c-{pod}"),
        std::path::Path::new(netns),
        &pod_args("default", pod),
        stdin.as_bytes(),
    )
    .expect("exec podwire-cni")
}

fn error_of(out: &CniOutcome) -> (u64, String) {
    assert!(!out.ok, "expected a failure, got success: {out:?}");
    let v: Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not error JSON ({e}): {out:?}"));
    assert!(v["cniVersion"].is_string(), "{v}");
    (
        v["code"].as_u64().expect("code"),
        v["msg"].as_str().expect("msg").to_string(),
    )
}

fn has_istio(ns: &Netns) -> bool {
    ns.nat_rules("iptables-save")
        .expect("save")
        .contains("ISTIO_")
}

#[test]
fn bad_input_gets_the_spec_code_and_changes_nothing() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(false, json!({})).expect("lab");
    lab.publish(
        "pods.json",
        &[
            pod_manifest("default", "good", true, &[]),
            pod_manifest(
                "default",
                "hostile",
                true,
                &[(
                    "traffic.sidecar.istio.io/excludeInboundPorts",
                    "80\n-A OUTPUT -j ACCEPT",
                )],
            ),
            pod_manifest(
                "default",
                "hostile2",
                true,
                &[(
                    "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                    "10.0.0.0/8 -j DROP",
                )],
            ),
            // Not a mode the mesh knows: refused, not started unredirected.
            pod_manifest(
                "default",
                "lowercase",
                true,
                &[("sidecar.istio.io/interceptionMode", "redirect")],
            ),
        ],
    )
    .expect("publish");
    let ns = Netns::new("c").expect("netns");
    let path = ns.path().display().to_string();
    let good = conf(&lab, json!({}));

    let cases: Vec<(&str, CniOutcome, u64, &str)> = vec![
        (
            "malformed stdin",
            run("ADD", &path, "good", "{not json"),
            6,
            "decode",
        ),
        (
            "stdin not an object",
            run("ADD", &path, "good", "[1,2]"),
            6,
            "decode",
        ),
        (
            "unknown cniVersion",
            run(
                "ADD",
                &path,
                "good",
                &conf(&lab, json!({"cniVersion": "9.9.9"})),
            ),
            1,
            "9.9.9",
        ),
        (
            "bad failurePolicy",
            run(
                "ADD",
                &path,
                "good",
                &conf(&lab, json!({"failurePolicy": "maybe"})),
            ),
            7,
            "failurePolicy",
        ),
        (
            "bad excludeNamespaces",
            run(
                "ADD",
                &path,
                "good",
                &conf(&lab, json!({"excludeNamespaces": "kube-system"})),
            ),
            7,
            "excludeNamespaces",
        ),
        (
            "bad iptables",
            run(
                "ADD",
                &path,
                "good",
                &conf(&lab, json!({"iptables": "ebtables"})),
            ),
            7,
            "iptables",
        ),
        (
            "unknown command",
            run("FROB", &path, "good", &good),
            4,
            "CNI_COMMAND",
        ),
        (
            "hostile ports annotation",
            run("ADD", &path, "hostile", &good),
            7,
            "traffic.sidecar.istio.io/excludeInboundPorts",
        ),
        (
            "hostile ranges annotation",
            run("ADD", &path, "hostile2", &good),
            7,
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
        ),
        (
            "unknown interception mode",
            run("ADD", &path, "lowercase", &good),
            7,
            "sidecar.istio.io/interceptionMode",
        ),
        (
            "missing netns",
            run("ADD", "/run/netns/podwire-does-not-exist", "good", &good),
            3,
            "/run/netns/podwire-does-not-exist",
        ),
    ];
    for (what, out, code, mention) in cases {
        let (got, msg) = error_of(&out);
        assert_eq!(got, code, "{what}: {msg}");
        assert!(
            msg.contains(mention),
            "{what}: message must mention {mention:?}: {msg}"
        );
        assert!(
            !out.stdout.contains("ERROR") && out.stdout.lines().count() == 1,
            "{what}: logs leaked to stdout: {:?}",
            out.stdout
        );
        assert!(!has_istio(&ns), "{what}: left rules behind");
    }

    // Each run checked as it ends (the cases above all run before any is checked).
    // A previous result that is not one would be printed as ours; one whose address cannot be
    // read would leave IPv6 unredirected. Past the size limit, a config is refused even if
    // what fits in the limit parses.
    for (what, stdin, mention) in [
        (
            "prevResult not an object",
            conf_prev(&lab, json!({}), "5"),
            "prevResult",
        ),
        (
            "prevResult ip without an address",
            conf_prev(
                &lab,
                json!({}),
                r#"{"ips":[{"address":"fd00::2/64"},{"interface":0}]}"#,
            ),
            "prevResult",
        ),
        (
            "stdin over 4 MiB",
            format!("{good}{}", " ".repeat(4 << 20)),
            "larger than 4 MiB",
        ),
    ] {
        let out = run("ADD", &path, "good", &stdin);
        let (code, msg) = error_of(&out);
        let want = if what.starts_with("stdin") { 6 } else { 7 };
        assert_eq!(code, want, "{what}: {msg}");
        assert!(msg.contains(mention), "{what}: {msg}");
        assert!(!has_istio(&ns), "{what}: left rules behind");
    }

    // CNI_NETNS naming the plugin's own netns (the node's): refused, nothing programmed there.
    // The plugin runs inside a throwaway "node" netns, so that a regression pollutes only it.
    let node = Netns::new("h").expect("node netns");
    let wrapper = lab.dir.join("in-node.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec ip netns exec {} {}\n",
            node.name,
            workspace_bin("podwire-cni").display()
        ),
    )
    .expect("wrapper");
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let env: Vec<(&str, String)> = vec![
        ("CNI_COMMAND", "ADD".to_string()),
        ("CNI_CONTAINERID", "c-own".to_string()),
        ("CNI_NETNS", node.path().display().to_string()),
        ("CNI_IFNAME", "eth0".to_string()),
        ("CNI_ARGS", pod_args("default", "good")),
    ];
    let out = exec_plugin(&wrapper, &env, good.as_bytes()).expect("exec");
    let (code, msg) = error_of(&out);
    assert_eq!(code, 3, "{msg}");
    assert!(
        msg.contains("the node's") && msg.contains(&node.name),
        "{msg}"
    );
    assert!(
        !has_istio(&node),
        "rules were programmed into the plugin's own netns"
    );

    // Missing environment, one variable at a time.
    for missing in ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS"] {
        let env: Vec<(&str, String)> = [
            ("CNI_COMMAND", "ADD".to_string()),
            ("CNI_CONTAINERID", "c1".to_string()),
            ("CNI_NETNS", path.clone()),
            ("CNI_IFNAME", "eth0".to_string()),
            ("CNI_ARGS", "K8S_POD_NAME=good".to_string()),
        ]
        .into_iter()
        .filter(|(k, _)| *k != missing)
        .collect();
        let out = exec_plugin(&workspace_bin("podwire-cni"), &env, good.as_bytes()).expect("exec");
        let (code, msg) = error_of(&out);
        assert_eq!(code, 4, "missing {missing}: {msg}");
        assert!(msg.contains(missing), "{msg}");
    }
    assert!(!has_istio(&ns));
}

#[test]
fn agent_unreachable_fails_closed_or_open_as_configured() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(false, json!({})).expect("lab");
    let ns = Netns::new("c").expect("netns");
    let path = ns.path().display().to_string();
    let down = json!({"agentSocket": "/run/podwire-test-no-agent.sock"});
    let (code, msg) = error_of(&run("ADD", &path, "any", &conf(&lab, down.clone())));
    assert_eq!(code, 11, "{msg}");
    assert!(
        msg.contains("default/any") && msg.contains("podwire-agent"),
        "{msg}"
    );
    // Open: the pod starts, untouched, and the previous result passes through byte for byte.
    let mut open = down;
    open["failurePolicy"] = json!("open");
    let out = run("ADD", &path, "any", &conf(&lab, open));
    assert!(out.ok, "{out:?}");
    assert_eq!(out.stdout.trim(), PREV);
    assert!(!has_istio(&ns));
    // Excluded namespaces never need the agent: system pods start while it is down.
    let stdin = conf(
        &lab,
        json!({"agentSocket": "/run/podwire-test-no-agent.sock"}),
    );
    let out = run_podwire(
        "ADD",
        "sys",
        ns.path().as_path(),
        &pod_args("kube-system", "coredns-1"),
        stdin.as_bytes(),
    )
    .expect("exec");
    assert!(
        out.ok,
        "kube-system pod must start without the agent: {out:?}"
    );
}

#[test]
fn add_is_idempotent_check_verifies_del_cleans_up() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(false, json!({})).expect("lab");
    lab.publish("p.json", &[pod_manifest("default", "life", true, &[])])
        .expect("publish");
    let ns = Netns::new("c").expect("netns");
    let path = ns.path().display().to_string();
    let c = conf(&lab, json!({}));

    let first = run("ADD", &path, "life", &c);
    assert!(first.ok, "{first:?}");
    assert_eq!(
        first.stdout.trim(),
        PREV,
        "prevResult must pass through unchanged"
    );
    let rules = ns.nat_rules("iptables-save").expect("save");
    let second = run("ADD", &path, "life", &c);
    assert!(second.ok, "second ADD must succeed: {second:?}");
    let count = |s: &str| s.lines().filter(|l| l.starts_with("-A ")).count();
    assert_eq!(
        count(&ns.nat_rules("iptables-save").expect("save")),
        count(&rules),
        "ADD twice must not duplicate rules"
    );
    assert!(run("CHECK", &path, "life", &c).ok, "CHECK on a fresh pod");

    // Someone flushes a chain: CHECK notices; ADD repairs it in one transaction.
    let out = ns
        .output(std::process::Command::new("iptables").args(["-t", "nat", "-F", "ISTIO_OUTPUT"]))
        .expect("flush");
    assert!(out.status.success());
    let (code, msg) = error_of(&run("CHECK", &path, "life", &c));
    assert_eq!(code, 100, "{msg}");
    assert!(
        msg.contains("ISTIO_OUTPUT") && msg.contains("default/life"),
        "{msg}"
    );
    assert!(run("ADD", &path, "life", &c).ok);
    assert!(
        run("CHECK", &path, "life", &c).ok,
        "ADD must have repaired the rules"
    );
    assert_eq!(
        count(&ns.nat_rules("iptables-save").expect("save")),
        count(&rules)
    );

    // CHECK is refused for configs older than 0.4.0 (the spec's rule).
    let old = c.replacen("\"1.0.0\"", "\"0.3.1\"", 1);
    assert_eq!(error_of(&run("CHECK", &path, "life", &old)).0, 1);

    // Record left for the agent, removed by DEL; DEL twice is fine; DEL with the netns gone too.
    let records = || {
        std::fs::read_dir(lab.dir.join("state/pods"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    assert_eq!(records(), 1);
    assert!(run("DEL", &path, "life", &c).ok);
    assert!(!has_istio(&ns), "DEL must remove every podwire rule");
    assert_eq!(records(), 0);
    assert!(run("DEL", &path, "life", &c).ok, "DEL twice");
    let gone = ns.path().display().to_string();
    drop(ns);
    assert!(
        run("DEL", &gone, "life", &c).ok,
        "DEL when the netns is gone"
    );
}

#[test]
fn version_status_and_gc() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(false, json!({})).expect("lab");
    let out = exec_plugin(
        &workspace_bin("podwire-cni"),
        &[("CNI_COMMAND", "VERSION".into())],
        br#"{"cniVersion":"1.1.0"}"#,
    )
    .expect("exec");
    assert!(out.ok, "{out:?}");
    let v: Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(v["cniVersion"], "1.1.0");
    for ver in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        assert!(
            v["supportedVersions"]
                .as_array()
                .expect("list")
                .contains(&json!(ver)),
            "{ver}"
        );
    }
    let status = |extra: Value| {
        let mut c = json!({"cniVersion": "1.1.0", "name": "contract", "type": "podwire-cni",
            "stateDir": lab.dir.join("state").display().to_string()});
        if let (Some(o), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        exec_plugin(
            &workspace_bin("podwire-cni"),
            &[("CNI_COMMAND", "STATUS".into())],
            c.to_string().as_bytes(),
        )
        .expect("exec")
    };
    assert!(status(json!({"agentSocket": lab.socket().display().to_string()})).ok);
    let (code, msg) = error_of(&status(
        json!({"agentSocket": "/run/podwire-test-no-agent.sock"}),
    ));
    assert_eq!(code, 50, "{msg}");
    assert!(msg.contains("/run/podwire-test-no-agent.sock"), "{msg}");

    // GC forgets records of attachments the runtime no longer has.
    lab.publish(
        "p.json",
        &[
            pod_manifest("default", "gc1", true, &[]),
            pod_manifest("default", "gc2", true, &[]),
        ],
    )
    .expect("publish");
    let (a, b) = (Netns::new("c").expect("ns"), Netns::new("c").expect("ns"));
    let c = conf(&lab, json!({}));
    assert!(run("ADD", &a.path().display().to_string(), "gc1", &c).ok);
    assert!(run("ADD", &b.path().display().to_string(), "gc2", &c).ok);
    let gc = json!({"cniVersion": "1.1.0", "name": "contract", "type": "podwire-cni",
        "stateDir": lab.dir.join("state").display().to_string(),
        "cni.dev/valid-attachments": [{"containerID": "c-gc1", "ifname": "eth0"}]});
    let out = exec_plugin(
        &workspace_bin("podwire-cni"),
        &[("CNI_COMMAND", "GC".into())],
        gc.to_string().as_bytes(),
    )
    .expect("exec");
    assert!(out.ok, "{out:?}");
    let left: Vec<String> = std::fs::read_dir(lab.dir.join("state/pods"))
        .expect("records dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["c-gc1.eth0.json".to_string()]);
}
