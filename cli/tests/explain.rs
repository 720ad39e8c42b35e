//! `podwire explain`, run as the real binary.

mod common;

use common::{fixture_arg, podwire};
use serde_json::{json, Value};

fn json_stream(s: &str) -> Vec<Value> {
    serde_json::Deserializer::from_str(s)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .expect("a stream of JSON objects")
}

#[test]
fn text_says_the_outcome_the_reason_and_the_rule() {
    let r = podwire(&["explain", "-f", &fixture_arg("pod.yaml")], None);
    assert!(r.ok, "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[0], "Pod shop/sleep: injected");
    assert!(
        lines[1].starts_with(
            "  reason:  injected: annotation sidecar.istio.io/inject=\"true\" on the pod"
        ),
        "{}",
        r.stdout
    );
    // Namespace labels not given: the reason says what was assumed.
    assert!(
        lines[1].contains("namespace labels not given"),
        "{}",
        r.stdout
    );
    assert_eq!(lines[2], "  rule:    4 (explicit)");
    assert_eq!(lines.len(), 3, "{}", r.stdout);
}

#[test]
fn text_explains_an_unselected_namespace_with_a_hint() {
    let r = podwire(
        &[
            "explain",
            "-f",
            &fixture_arg("pod.yaml"),
            "--namespace-labels",
            "team=shop",
        ],
        None,
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stdout.starts_with("Pod shop/sleep: skipped\n"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("kubectl label namespace shop istio-injection=enabled --overwrite"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("  rule:    7 (namespace-selector)"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("  warning: annotation sidecar.istio.io/inject=\"true\" is ignored"),
        "{}",
        r.stdout
    );
}

#[test]
fn json_has_the_decision_and_its_reason() {
    let r = podwire(
        &[
            "explain",
            "-f",
            &fixture_arg("hostnetwork-pod.yaml"),
            "-o",
            "json",
        ],
        None,
    );
    assert!(r.ok, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).expect("one JSON object");
    assert_eq!(
        v,
        json!({
            "kind": "Pod", "namespace": "monitoring", "name": "node-exporter",
            "result": "skipped", "inject": false, "step": "host-network", "rule": 1,
            "reason": "skipped: pod uses hostNetwork: true; redirection would hit the node",
            "warnings": ["annotation sidecar.istio.io/inject=\"true\" is ignored: pods with hostNetwork are never injected"]
        })
    );
}

#[test]
fn every_pod_template_in_a_multi_document_file_is_explained() {
    let r = podwire(
        &[
            "explain",
            "-f",
            &fixture_arg("app.yaml"),
            "-o",
            "json",
            "--namespace-labels",
            "istio-injection=enabled",
        ],
        None,
    );
    assert!(r.ok, "{}", r.stderr);
    let all = json_stream(&r.stdout);
    let names: Vec<(&str, &str, &str)> = all
        .iter()
        .map(|v| {
            (
                v["kind"].as_str().unwrap_or(""),
                v["name"].as_str().unwrap_or(""),
                v["result"].as_str().unwrap_or(""),
            )
        })
        .collect();
    // The Service is no pod; the Deployment's own inject "false" is not its pods'.
    assert_eq!(
        names,
        [
            ("Deployment", "web", "injected"),
            ("CronJob", "report", "injected")
        ]
    );
    assert_eq!(all[0]["step"], json!("policy"));
}

#[test]
fn only_the_pod_templates_metadata_counts() {
    let r = podwire(
        &["explain", "-f", &fixture_arg("deployment-opt-out.yaml")],
        None,
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stdout
            .starts_with("Deployment shop/batch (pod template): skipped\n"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("skipped: annotation sidecar.istio.io/inject=\"false\" on the pod"),
        "{}",
        r.stdout
    );
}

#[test]
fn a_refused_pod_says_which_annotation() {
    let r = podwire(
        &[
            "explain",
            "-f",
            &fixture_arg("bad-annotation.yaml"),
            "-o",
            "json",
        ],
        None,
    );
    assert!(r.ok, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).expect("json");
    assert_eq!(v["result"], json!("refused"));
    let why = v["refused"].as_str().expect("refused message");
    assert!(
        why.contains("traffic.sidecar.istio.io/excludeInboundPorts=\"80;reboot\""),
        "{why}"
    );
}

#[test]
fn config_and_stdin() {
    // policy: disabled, alwaysInjectSelector mesh=on.
    let pod = b"apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {mesh: \"on\"}}\nspec: {containers: [{name: app, image: x}]}\n";
    let r = podwire(
        &[
            "explain",
            "-f",
            "-",
            "--config",
            &fixture_arg("config.yaml"),
            "-o",
            "json",
        ],
        Some(pod),
    );
    assert!(r.ok, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).expect("json");
    assert_eq!(
        (v["namespace"].clone(), v["step"].clone()),
        (json!("default"), json!("always-inject-selector"))
    );
    assert!(
        v["reason"]
            .as_str()
            .unwrap_or("")
            .contains("alwaysInjectSelector[0] (mesh=on)"),
        "{v}"
    );
}

#[test]
fn nothing_to_explain_is_an_error() {
    let r = podwire(
        &["explain", "-f", "-"],
        Some(b"apiVersion: v1\nkind: Service\nmetadata: {name: s}\n"),
    );
    assert!(!r.ok);
    assert!(r.stderr.contains("no Pod or pod template"), "{}", r.stderr);
    let r = podwire(&["explain", "-f", "/nonexistent/pod.yaml"], None);
    assert!(
        !r.ok && r.stderr.contains("/nonexistent/pod.yaml"),
        "{}",
        r.stderr
    );
    let r = podwire(&["explain", "-f", "-"], Some(b"kind: Pod\nmetadata: [\n"));
    assert!(!r.ok && r.stderr.contains("not valid YAML"), "{}", r.stderr);
}
