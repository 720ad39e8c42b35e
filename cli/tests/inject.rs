//! `podwire inject`, run as the real binary: only pod templates change, exactly as the webhook
//! would change the pods.

mod common;

use common::{fixture, fixture_arg, podwire};
use podwire_core::inject::{apply_patch, plan, InjectorConfig};
use podwire_core::MeshProfile;
use serde::Deserialize;
use serde_json::{json, Value};

/// Documents of a multi-document YAML stream, as JSON values. Read as YAML first: serde_json
/// reading YAML directly would take a leaked `$serde_json::private::RawValue` mapping for the
/// JSON it wraps, and hide it.
fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| {
            let doc = serde_yaml_ng::Value::deserialize(d).expect("YAML document");
            serde_json::to_value(doc).expect("JSON-compatible YAML")
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn without(mut v: Value, pointer: &str) -> Value {
    let (parent, key) = pointer.rsplit_once('/').expect("pointer");
    if let Some(Value::Object(m)) = v.pointer_mut(parent) {
        m.remove(key);
    }
    v
}

/// Names in `containers` then `initContainers` (where the native-sidecar proxy is).
fn containers(v: &Value, template: &str) -> Vec<String> {
    let mut names = names(v, template, "containers");
    names.extend(names_init(v, template));
    names
}

fn names_init(v: &Value, template: &str) -> Vec<String> {
    names(v, template, "initContainers")
}

fn names(v: &Value, template: &str, list: &str) -> Vec<String> {
    v.pointer(&format!("{template}/spec/{list}"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|c| c["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn only_pod_templates_change_in_a_multi_document_file() {
    let input = std::fs::read_to_string(fixture("app.yaml")).expect("fixture");
    let r = podwire(&["inject", "-f", &fixture_arg("app.yaml")], None);
    assert!(r.ok, "{}", r.stderr);
    let (before, after) = (docs(&input), docs(&r.stdout));
    assert_eq!(after.len(), 3);
    // The Service (even with an inject annotation) is untouched.
    assert_eq!(after[0], before[0]);
    // Deployment: its own metadata and spec are untouched; the template got the proxy.
    assert_eq!(
        without(after[1].clone(), "/spec/template"),
        without(before[1].clone(), "/spec/template")
    );
    assert_eq!(
        containers(&after[1], "/spec/template"),
        ["web", "istio-proxy"]
    );
    let ann = &after[1]["spec"]["template"]["metadata"]["annotations"];
    assert!(ann["sidecar.istio.io/status"].is_string(), "{ann}");
    assert_eq!(
        ann["traffic.sidecar.istio.io/excludeOutboundPorts"],
        json!("5432")
    );
    // Native sidecar (the default layout): the proxy is the only init container.
    assert_eq!(names_init(&after[1], "/spec/template"), ["istio-proxy"]);
    // CronJob: the template under jobTemplate.
    let t = "/spec/jobTemplate/spec/template";
    assert_eq!(without(after[2].clone(), t), without(before[2].clone(), t));
    assert_eq!(containers(&after[2], t), ["report", "istio-proxy"]);
}

#[test]
fn injection_is_idempotent() {
    let once = podwire(&["inject", "-f", &fixture_arg("app.yaml")], None);
    assert!(once.ok, "{}", once.stderr);
    let twice = podwire(&["inject", "-f", "-"], Some(once.stdout.as_bytes()));
    assert!(twice.ok, "{}", twice.stderr);
    assert_eq!(twice.stdout, once.stdout);
}

#[test]
fn kube_system_deployment_is_untouched() {
    let input = std::fs::read_to_string(fixture("kube-system.yaml")).expect("fixture");
    let r = podwire(&["inject", "-f", &fixture_arg("kube-system.yaml")], None);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(docs(&r.stdout), docs(&input));
    assert!(
        r.stderr.contains("Deployment kube-system/coredns: annotation sidecar.istio.io/inject=\"true\" is ignored: namespace kube-system is never injected"),
        "{}",
        r.stderr
    );
}

#[test]
fn the_pods_opt_out_beats_the_deployments_opt_in() {
    let input = std::fs::read_to_string(fixture("deployment-opt-out.yaml")).expect("fixture");
    let r = podwire(
        &["inject", "-f", &fixture_arg("deployment-opt-out.yaml")],
        None,
    );
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(docs(&r.stdout), docs(&input));
}

#[test]
fn a_pod_gets_exactly_the_webhooks_patch() {
    let input = std::fs::read_to_string(fixture("pod.yaml")).expect("fixture");
    let r = podwire(&["inject", "-f", "-"], Some(input.as_bytes()));
    assert!(r.ok, "{}", r.stderr);
    let mut want = docs(&input).remove(0);
    let p = plan(
        &want,
        None,
        None,
        &InjectorConfig::default(),
        &MeshProfile::istio(),
    )
    .expect("pod");
    apply_patch(&mut want, &p.patch.expect("accepted")).expect("applies");
    assert_eq!(docs(&r.stdout), vec![want]);
}

#[test]
fn a_refused_pod_stops_everything() {
    let r = podwire(&["inject", "-f", &fixture_arg("bad-annotation.yaml")], None);
    assert!(!r.ok);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    assert!(
        r.stderr.contains("document 1 (Pod shop/bad): injection refused: annotation traffic.sidecar.istio.io/excludeInboundPorts=\"80;reboot\""),
        "{}",
        r.stderr
    );
}

#[test]
fn config_and_namespace_labels_are_honoured() {
    let input = std::fs::read_to_string(fixture("app.yaml")).expect("fixture");
    // policy: disabled and no pod opts in: nothing changes.
    let r = podwire(
        &[
            "inject",
            "-f",
            &fixture_arg("app.yaml"),
            "--config",
            &fixture_arg("config.yaml"),
        ],
        None,
    );
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(docs(&r.stdout), docs(&input));
    // An unselected namespace: nothing changes either.
    let r = podwire(
        &[
            "inject",
            "-f",
            &fixture_arg("app.yaml"),
            "--namespace-labels",
            "istio-injection=disabled",
        ],
        None,
    );
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(docs(&r.stdout), docs(&input));
    // The config's proxy image and injected annotations are used.
    let r = podwire(
        &[
            "inject",
            "-f",
            &fixture_arg("pod.yaml"),
            "--config",
            &fixture_arg("config.yaml"),
        ],
        None,
    );
    assert!(r.ok, "{}", r.stderr);
    let out = docs(&r.stdout).remove(0);
    assert_eq!(
        out["spec"]["initContainers"][0]["image"],
        json!("registry.example.com/mesh/proxy:2.0")
    );
    assert_eq!(
        out["metadata"]["annotations"]["example.com/injected-by"],
        json!("podwire")
    );
}

#[test]
fn lists_and_json_input_are_read() {
    let list = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "namespace": "shop"},
         "spec": {"containers": [{"name": "app", "image": "x"}]}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": "v"}}
    ]});
    let r = podwire(&["inject", "-f", "-"], Some(list.to_string().as_bytes()));
    assert!(r.ok, "{}", r.stderr);
    let out = docs(&r.stdout).remove(0);
    assert_eq!(containers(&out, "/items/0"), ["app", "istio-proxy"]);
    assert_eq!(out["items"][1], list["items"][1]);
}
