//! The plugin under faults (issue "fail closed everywhere"): foreign rules survive DEL, a rule
//! shadowing podwire's entry rules is reported by CHECK and repaired by ADD, concurrent ADD and
//! DEL of one attachment never leave rules without a record, record names never collide,
//! errors come back in the config's cniVersion, ambiguous CIDRs are refused. Real netns, real
//! iptables, real traffic.

use podwire_lab::chain::{cni_env, exec_plugin, pod_args, run_podwire, CniOutcome};
use podwire_lab::lab::{pod_manifest, Lab, APP_PORT, NODE_V4};
use podwire_lab::probe::{self, connect};
use podwire_lab::{bins::workspace_bin, require_root, Netns};
use serde_json::{json, Value};
use std::process::Command;

fn conf(lab: &Lab, version: &str) -> String {
    json!({
        "cniVersion": version, "name": "faults", "type": "podwire-cni",
        "agentSocket": lab.socket().display().to_string(),
        "stateDir": lab.dir.join("state").display().to_string(),
        "logLevel": "warn",
        "prevResult": {"cniVersion": version, "ips": [{"address": "198.18.0.9/24"}]},
    })
    .to_string()
}

fn run(command: &str, netns: &Netns, container: &str, pod: &str, stdin: &str) -> CniOutcome {
    run_podwire(
        command,
        container,
        &netns.path(),
        &pod_args("default", pod),
        stdin.as_bytes(),
    )
    .expect("exec podwire-cni")
}

fn ipt(ns: &Netns, args: &[&str]) {
    let out = ns
        .output(Command::new("iptables").args(["-t", "nat"]).args(args))
        .expect("iptables");
    assert!(out.status.success(), "iptables {args:?}: {out:?}");
}

fn saved(ns: &Netns) -> String {
    ns.nat_rules("iptables-save").expect("save")
}

fn error_of(out: &CniOutcome) -> Value {
    assert!(!out.ok, "expected a failure, got success: {out:?}");
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not error JSON ({e}): {out:?}"))
}

/// `containerID/ifname` of every record the plugin left (read from their content).
fn records(lab: &Lab) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(lab.dir.join("state/pods"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .filter_map(|e| std::fs::read(e.path()).ok())
                .filter_map(|b| serde_json::from_slice::<Value>(&b).ok())
                .map(|r| {
                    format!(
                        "{}/{}",
                        r["containerId"].as_str().unwrap_or("?"),
                        r["ifname"].as_str().unwrap_or("?")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn del_removes_only_what_podwire_added() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(false, json!({})).expect("lab");
    lab.publish(
        "p.json",
        &[
            pod_manifest("default", "plainrules", true, &[]),
            pod_manifest(
                "default",
                "excl",
                true,
                &[("traffic.sidecar.istio.io/excludeInterfaces", "eth9")],
            ),
        ],
    )
    .expect("publish");
    let c = conf(&lab, "1.0.0");

    // A pod without excludeInterfaces; someone else owns `-o/-i eth9 -j RETURN`.
    let ns = Netns::new("f").expect("netns");
    assert!(run("ADD", &ns, "c-plain", "plainrules", &c).ok);
    ipt(&ns, &["-A", "OUTPUT", "-o", "eth9", "-j", "RETURN"]);
    ipt(&ns, &["-A", "PREROUTING", "-i", "eth9", "-j", "RETURN"]);
    let out = run("DEL", &ns, "c-plain", "plainrules", &c);
    assert!(out.ok, "{out:?}");
    let after = saved(&ns);
    assert!(!after.contains("ISTIO_"), "{after}");
    assert!(after.contains("-A OUTPUT -o eth9 -j RETURN"), "{after}");
    assert!(after.contains("-A PREROUTING -i eth9 -j RETURN"), "{after}");

    // A pod excluding eth9 itself, plus the same rule from someone else: one copy stays.
    let ns = Netns::new("f").expect("netns");
    assert!(run("ADD", &ns, "c-excl", "excl", &c).ok);
    ipt(&ns, &["-A", "OUTPUT", "-o", "eth9", "-j", "RETURN"]);
    assert_eq!(saved(&ns).matches("-A OUTPUT -o eth9 -j RETURN").count(), 2);
    assert!(run("DEL", &ns, "c-excl", "excl", &c).ok);
    let after = saved(&ns);
    assert!(!after.contains("ISTIO_"), "{after}");
    assert_eq!(
        after.matches("-A OUTPUT -o eth9 -j RETURN").count(),
        1,
        "{after}"
    );
    assert!(
        !after.contains("-i eth9"),
        "podwire's own PREROUTING exclusion goes: {after}"
    );
}

#[test]
fn a_rule_shadowing_the_redirection_is_reported_and_repaired() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(false, json!({})).expect("lab");
    lab.publish("p.json", &[pod_manifest("default", "shadowed", true, &[])])
        .expect("publish");
    let pod = lab.start_pod("default", "shadowed").expect("pod");
    probe::start_proxy(&pod.netns, false).expect("proxy");
    let node = format!("{NODE_V4}:{APP_PORT}");
    assert_eq!(connect(&pod.netns, &node).expect("out").label, "PROXY-OUT");

    ipt(
        &pod.netns,
        &["-I", "OUTPUT", "1", "-p", "tcp", "-j", "ACCEPT"],
    );
    assert_eq!(
        connect(&pod.netns, &node).expect("out").label,
        "NODE",
        "the inserted rule bypasses the proxy (the fault under test)"
    );
    let checks = lab.run("CHECK", &pod).expect("CHECK");
    let (_, out) = checks
        .iter()
        .find(|(p, _)| p == "podwire-cni")
        .expect("podwire-cni ran");
    let err = error_of(out);
    assert_eq!(err["code"], 100, "{err}");
    let msg = err["msg"].as_str().unwrap_or_default();
    assert!(
        msg.contains("-A OUTPUT -p tcp -j ACCEPT comes first"),
        "CHECK names the shadowing rule: {msg}"
    );

    // ADD again (the runtime retrying): the entry rules go back in front.
    let (cid, path, args) = lab.attachment(&pod.netns, "default", "shadowed");
    let mut entry = lab.chain.conflist["plugins"][1].clone();
    assert_eq!(entry["type"], "podwire-cni");
    entry["cniVersion"] = json!("1.0.0");
    entry["name"] = lab.chain.conflist["name"].clone();
    entry["prevResult"] = pod.result.clone();
    let out = run_podwire("ADD", &cid, &path, &args, entry.to_string().as_bytes()).expect("exec");
    assert!(out.ok, "{out:?}");
    let rules = saved(&pod.netns);
    let output: Vec<&str> = rules
        .lines()
        .filter(|l| l.starts_with("-A OUTPUT "))
        .collect();
    assert_eq!(
        output,
        ["-A OUTPUT -j ISTIO_OUTPUT", "-A OUTPUT -p tcp -j ACCEPT"],
        "entry rule first again, the foreign rule kept: {rules}"
    );
    assert_eq!(connect(&pod.netns, &node).expect("out").label, "PROXY-OUT");
    for (plugin, out) in lab.run("CHECK", &pod).expect("CHECK") {
        assert!(out.ok, "CHECK after repair failed in {plugin}: {out:?}");
    }
}

#[test]
fn concurrent_add_and_del_never_leave_rules_without_a_record() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(false, json!({})).expect("lab");
    lab.publish("p.json", &[pod_manifest("default", "racer", true, &[])])
        .expect("publish");
    let c = conf(&lab, "1.0.0");
    for round in 0..20 {
        let ns = Netns::new("r").expect("netns");
        let container = format!("c-race-{round}");
        let (add, del) = std::thread::scope(|s| {
            let add = s.spawn(|| run("ADD", &ns, &container, "racer", &c));
            let del = s.spawn(|| run("DEL", &ns, &container, "racer", &c));
            (
                add.join().expect("ADD thread"),
                del.join().expect("DEL thread"),
            )
        });
        assert!(add.ok && del.ok, "round {round}: {add:?} {del:?}");
        let has_rules = saved(&ns).contains("ISTIO_OUTPUT");
        let has_record = records(&lab).contains(&format!("{container}/eth0"));
        assert_eq!(
            has_rules, has_record,
            "round {round}: rules present {has_rules}, record present {has_record}"
        );
        // Whatever the order was, a final DEL leaves nothing.
        assert!(run("DEL", &ns, &container, "racer", &c).ok);
        assert!(!saved(&ns).contains("ISTIO_"));
    }
    assert_eq!(records(&lab), Vec::<String>::new());
}

#[test]
fn attachments_whose_names_used_to_collide_keep_their_own_records() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(false, json!({})).expect("lab");
    lab.publish("p.json", &[pod_manifest("default", "twin", true, &[])])
        .expect("publish");
    let c = conf(&lab, "1.0.0");
    let exec = |command: &str, ns: &Netns, container: &str, ifname: &str| {
        let mut env = cni_env(command, container, &ns.path(), &pod_args("default", "twin"));
        env.retain(|(k, _)| *k != "CNI_IFNAME");
        env.push(("CNI_IFNAME", ifname.to_string()));
        exec_plugin(&workspace_bin("podwire-cni"), &env, c.as_bytes()).expect("exec")
    };
    let (a, b) = (
        Netns::new("t").expect("netns"),
        Netns::new("t").expect("netns"),
    );
    assert!(exec("ADD", &a, "x", "y_z").ok);
    assert!(exec("ADD", &b, "x_y", "z").ok);
    assert_eq!(records(&lab).len(), 2, "{:?}", records(&lab));
    assert!(exec("DEL", &a, "x", "y_z").ok);
    assert_eq!(
        records(&lab).len(),
        1,
        "the other attachment keeps its record"
    );
    assert!(saved(&b).contains("ISTIO_OUTPUT"));
    assert!(exec("DEL", &b, "x_y", "z").ok);
    assert!(records(&lab).is_empty());
}

#[test]
fn errors_speak_the_configs_cni_version_and_ambiguous_cidrs_are_refused() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(false, json!({})).expect("lab");
    lab.publish(
        "p.json",
        &[pod_manifest(
            "default",
            "octal",
            true,
            &[(
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                "010.0.0.0/8",
            )],
        )],
    )
    .expect("publish");
    let ns = Netns::new("v").expect("netns");
    // A config error in a 1.0.0 config is answered in 1.0.0.
    let mut bad: Value = serde_json::from_str(&conf(&lab, "1.0.0")).expect("json");
    bad["failurePolicy"] = json!("sometimes");
    let err = error_of(&run("ADD", &ns, "c-v", "octal", &bad.to_string()));
    assert_eq!(
        (err["cniVersion"].as_str(), err["code"].as_u64()),
        (Some("1.0.0"), Some(7)),
        "{err}"
    );
    assert!(
        err["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("failurePolicy"),
        "{err}"
    );
    // A pod error in a 0.4.0 config, and the leading-zero CIDR is refused naming the annotation.
    let err = error_of(&run("ADD", &ns, "c-v", "octal", &conf(&lab, "0.4.0")));
    assert_eq!(
        (err["cniVersion"].as_str(), err["code"].as_u64()),
        (Some("0.4.0"), Some(7)),
        "{err}"
    );
    let msg = err["msg"].as_str().unwrap_or_default();
    assert!(
        msg.contains("excludeOutboundIPRanges") && msg.contains("leading zero"),
        "{msg}"
    );
    assert!(!saved(&ns).contains("ISTIO_"), "nothing applied");
    assert!(records(&lab).is_empty(), "{:?}", records(&lab));
}
