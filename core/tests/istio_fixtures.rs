//! Golden comparisons against Istio's own injection fixtures (pkg/kube/inject/testdata/inject
//! at the commit named in testdata/istio/NOTICE): each input goes through podwire's injection
//! with the values and mesh config Istio's TestInjection uses for it, and the result must equal
//! Istio's output after this normaliser, applied to both sides where it says so. A case Istio
//! leaves alone (hostNetwork, `inject: "false"`) must be left alone; a `refused:` case (a
//! template podwire does not render, a bad traffic annotation Istio refuses too) must be
//! refused naming the annotation; and every injected pod must be what podwire-cni redirects
//! (a sidecar in REDIRECT mode) or leaves alone (a gateway, another mode). Every injected pod,
//! podwire's and (as a check of the check) Istio's, must also read as the Kubernetes API's
//! own `PodTemplateSpec` (k8s-openapi, the workspace's pinned release) and write back the same:
//! the API server silently drops a field it does not know from a webhook's patch.
//!
//! 1. Istio's `istio-init` / `istio-validation` init containers are dropped from the expected
//!    pod, from the `initContainers` list of its `sidecar.istio.io/status` and from its
//!    `proxy.istio.io/overrides` (podwire adds no init container: podwire-cni programs the
//!    redirection; a pod's own customisation of them is dropped with a warning).
//! 2. Against a fixture rendered without istio-cni (the case's values leave
//!    `pilot.cni.enabled` off) the annotations podwire-cni reads
//!    (`sidecar.istio.io/interceptionMode`, `traffic.sidecar.istio.io/*`) are dropped from both
//!    pods: Istio writes them only for its CNI (otherwise it passes the pod's own through and
//!    gives their values to istio-init), and podwire always writes them as for its CNI.
//! 3. The proxy's `seccompProfile: RuntimeDefault`, which podwire adds so a restricted pod stays
//!    restricted, is dropped from podwire's pod when Istio's has none.
//! 4. Encoding only: a volume with no source is `emptyDir: {}` (the API server's default);
//!    quantities compare by value (`2000m` = `2`); JSON carried in strings (`PROXY_CONFIG`,
//!    `ISTIO_KUBE_APP_PROBERS`, `ISTIO_PROMETHEUS_ANNOTATIONS`, the status and overrides
//!    annotations) compares as JSON; `resources: {}` and `creationTimestamp: null`, which Go
//!    writes for empty fields, are dropped, and an env var's `value: ""`, which Go leaves out,
//!    is absent.

use podwire_core::inject::json::Json;
use podwire_core::inject::quantity::Quantity;
use podwire_core::inject::{apply_patch, plan_in, InjectorConfig, PatchOp, Workload};
use podwire_core::{mesh_decision, MeshProfile, PodInfo};
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/istio")
}

fn yaml(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{path:?}: {e}")))
        .filter(|v| !v.is_null())
        .flat_map(|v| match v["kind"].as_str() {
            // kube-inject injects each item of a List.
            Some("List") => v["items"].as_array().cloned().unwrap_or_default(),
            _ => vec![v],
        })
        .collect()
}

#[derive(Debug, Deserialize)]
struct Case {
    #[serde(rename = "in")]
    input: String,
    /// Absent for a case Istio refuses too (only `refused` is checked).
    #[serde(default)]
    want: String,
    #[serde(default)]
    values: Value,
    #[serde(default)]
    mesh: Value,
    /// podwire refuses this pod (a template it does not render): the error must name this.
    #[serde(default)]
    refused: Option<String>,
}

fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                // A null member is kept as null (Istio's values: `cpu: null` drops the key).
                match v {
                    Value::Null => {
                        b.insert(k.clone(), Value::Null);
                    }
                    v => merge(b.entry(k.clone()).or_insert(Value::Null), v),
                }
            }
        }
        (_, Value::Null) => {}
        (b, o) => *b = o.clone(),
    }
}

/// The pod template of a workload document and the workload Istio's kube-inject names.
fn template(doc: &Value) -> (Value, Workload, Vec<&'static str>) {
    let s = |k: &str| doc[k].as_str().unwrap_or("").to_string();
    let meta = |k: &str| doc["metadata"][k].as_str().unwrap_or("").to_string();
    let w = Workload {
        api_version: s("apiVersion"),
        kind: s("kind"),
        name: meta("name"),
        namespace: meta("namespace"),
    };
    let path = match doc["kind"].as_str() {
        Some("Pod") => vec![],
        Some("CronJob") => vec!["spec", "jobTemplate", "spec", "template"],
        _ => vec!["spec", "template"],
    };
    let mut t = doc.clone();
    for p in &path {
        t = t[*p].clone();
    }
    (t, w, path)
}

/// A bare Pod names its workload through its owner reference, as the webhook reads it.
fn pod_owner(w: &Workload) -> Option<&Workload> {
    (w.kind != "Pod").then_some(w)
}

/// The proxy Istio rendered.
fn istio_proxy(pod: &Value) -> Option<&Value> {
    ["initContainers", "containers"]
        .iter()
        .filter_map(|l| pod["spec"][l].as_array())
        .flatten()
        .find(|c| c["name"] == "istio-proxy")
}

/// The args of the proxy Istio rendered.
fn istio_args(pod: &Value) -> Vec<Value> {
    istio_proxy(pod)
        .and_then(|c| c["args"].as_array().cloned())
        .unwrap_or_default()
}

fn is_cni_annotation(k: &str) -> bool {
    k == "sidecar.istio.io/interceptionMode" || k.starts_with("traffic.sidecar.istio.io/")
}

fn quantities_by_value(c: &mut Value) {
    if let Some(r) = c.get_mut("resources") {
        for kind in ["requests", "limits"] {
            if let Some(Value::Object(m)) = r.get_mut(kind) {
                for q in m.values_mut() {
                    let text = match &*q {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    let v = Quantity::parse(&text).expect("quantity").value();
                    *q = json!(v);
                }
            }
        }
    }
}

fn normalise(pod: &mut Value, expected: bool, cni: bool, istio_seccomp: bool) {
    let spec = &mut pod["spec"];
    if expected {
        if let Some(Value::Array(inits)) = spec.get_mut("initContainers") {
            inits.retain(|c| c["name"] != "istio-init" && c["name"] != "istio-validation");
            if inits.is_empty() {
                spec.as_object_mut().map(|m| m.remove("initContainers"));
            }
        }
    }
    for list in ["containers", "initContainers"] {
        if let Some(Value::Array(cs)) = spec.get_mut(list) {
            for c in cs {
                if c.get("resources") == Some(&json!({})) {
                    c.as_object_mut().map(|m| m.remove("resources"));
                }
                quantities_by_value(c);
                if c["name"] == "istio-proxy" {
                    if !expected && !istio_seccomp {
                        if let Some(sc) =
                            c.get_mut("securityContext").and_then(Value::as_object_mut)
                        {
                            if sc.get("seccompProfile") == Some(&json!({"type": "RuntimeDefault"}))
                            {
                                sc.remove("seccompProfile");
                            }
                        }
                    }
                    if let Some(Value::Array(env)) = c.get_mut("env") {
                        for e in env {
                            if e.get("value") == Some(&json!("")) {
                                e.as_object_mut().map(|m| m.remove("value"));
                            }
                            let n = e["name"].as_str().unwrap_or("");
                            if [
                                "PROXY_CONFIG",
                                "ISTIO_KUBE_APP_PROBERS",
                                "ISTIO_PROMETHEUS_ANNOTATIONS",
                            ]
                            .contains(&n)
                            {
                                let text = e["value"].as_str().unwrap_or("").to_string();
                                e["value"] = serde_json::from_str(&text).unwrap_or(json!(text));
                            }
                        }
                    }
                }
            }
        }
    }
    if let Some(Value::Array(vols)) = spec.get_mut("volumes") {
        for v in vols {
            if v.as_object().is_some_and(|m| m.len() == 1) {
                v["emptyDir"] = json!({});
            }
            if v.get("emptyDir") == Some(&Value::Null) {
                v["emptyDir"] = json!({});
            }
        }
    }
    let meta = &mut pod["metadata"];
    if let Some(m) = meta.as_object_mut() {
        m.remove("creationTimestamp");
    }
    if let Some(Value::Object(a)) = meta.get_mut("annotations") {
        if !cni {
            a.retain(|k, _| !is_cni_annotation(k));
        }
        for k in ["sidecar.istio.io/status", "proxy.istio.io/overrides"] {
            if let Some(v) = a.get_mut(k) {
                let mut parsed: Value =
                    serde_json::from_str(v.as_str().unwrap_or("")).expect("JSON annotation");
                if k == "sidecar.istio.io/status" && expected {
                    if let Some(Value::Array(l)) = parsed.get_mut("initContainers") {
                        l.retain(|c| c != "istio-init" && c != "istio-validation");
                        if l.is_empty() {
                            parsed["initContainers"] = Value::Null;
                        }
                    }
                }
                if k == "proxy.istio.io/overrides" {
                    for list in ["containers", "initContainers"] {
                        if let Some(Value::Array(cs)) = parsed.get_mut(list) {
                            if expected {
                                cs.retain(|c| {
                                    c["name"] != "istio-init" && c["name"] != "istio-validation"
                                });
                            }
                            for c in cs.iter_mut() {
                                if c.get("resources") == Some(&json!({})) {
                                    c.as_object_mut().map(|m| m.remove("resources"));
                                }
                                quantities_by_value(c);
                            }
                        }
                    }
                }
                *v = parsed;
            }
        }
    }
}

/// Paths where `a` and `b` differ, for a readable failure.
fn diff(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    diff_as(a, b, path, out, ["podwire", "istio  "]);
}

/// Where `a` and `b` differ, each side shown under its label.
fn diff_as(a: &Value, b: &Value, path: &str, out: &mut Vec<String>, labels: [&str; 2]) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for k in x.keys().chain(y.keys().filter(|k| !x.contains_key(*k))) {
                diff_as(
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    &format!("{path}/{k}"),
                    out,
                    labels,
                );
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                diff_as(p, q, &format!("{path}/{i}"), out, labels);
            }
        }
        _ if a != b => out.push(format!(
            "{path}:\n   {}: {a}\n   {}: {b}",
            labels[0], labels[1]
        )),
        _ => {}
    }
}

/// Whether `pod` (a pod template: metadata and spec) reads as the Kubernetes API's own
/// `PodTemplateSpec` and writes back the same: a field the API does not know (a misspelling,
/// a field of a newer release than the pinned one), which the API server drops from a
/// webhook's patch without a word, or a value of the wrong type, fails here. The only null
/// allowed is Go's `creationTimestamp: null` (an unset time); any other null (an annotation's
/// value, a container's name) is a difference.
fn survives_the_api_types(pod: &Value) -> Result<(), String> {
    use k8s_openapi::api::core::v1::PodTemplateSpec;
    let mut sent = json!({"metadata": pod["metadata"], "spec": pod["spec"]});
    if let Some(m) = sent["metadata"].as_object_mut() {
        if m.get("creationTimestamp").is_some_and(Value::is_null) {
            m.remove("creationTimestamp");
        }
    }
    let typed: PodTemplateSpec = serde_json::from_value(sent.clone())
        .map_err(|e| format!("is not a Kubernetes pod: {e}"))?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    diff_as(
        &back,
        &sent,
        "",
        &mut out,
        ["the API keeps", "sent         "],
    );
    if out.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "changes through the Kubernetes API's types:\n  {}",
            out.join("\n  ")
        ))
    }
}

#[test]
fn the_api_types_check_catches_what_the_api_server_drops_or_refuses() {
    let pod = json!({
        "metadata": {"name": "p", "annotations": {"a": "b"}, "creationTimestamp": null},
        "spec": {"initContainers": [{"name": "istio-proxy", "image": "proxyv2",
                                     "restartPolicy": "Always",
                                     "securityContext": {"runAsUser": 1337}}],
                 "containers": [{"name": "app", "image": "app"}]},
    });
    assert_eq!(survives_the_api_types(&pod), Ok(()));
    for (pointer, bad) in [
        // A misspelling: dropped by the API server, the sidecar becomes a blocking init.
        ("/spec/initContainers/0/restartPolcy", json!("Always")),
        // Wrong types: refused.
        (
            "/spec/initContainers/0/securityContext/runAsUser",
            json!("1337"),
        ),
        ("/spec/containers/0/ports", json!([{"containerPort": "80"}])),
        // A null where a value is needed.
        ("/metadata/annotations/a", Value::Null),
        ("/spec/containers/0/name", Value::Null),
    ] {
        let mut p = pod.clone();
        let (parent, key) = pointer.rsplit_once('/').expect("a member");
        p.pointer_mut(parent).expect("parent")[key] = bad;
        assert!(survives_the_api_types(&p).is_err(), "{pointer} passed");
    }
}

#[test]
fn istio_fixtures_match_after_the_documented_normaliser() {
    let d = dir();
    let base_values = yaml(&d.join("values.yaml")).remove(0);
    let base_mesh = yaml(&d.join("mesh.yaml")).remove(0);
    let cases: Vec<Case> =
        serde_json::from_value(yaml(&d.join("cases.yaml")).remove(0)).expect("cases");
    assert!(cases.len() >= 15, "at least 15 fixtures");
    let profile = MeshProfile::istio();
    let (mut native, mut classic, mut refused, mut failures) = (0, 0, 0, Vec::new());
    for case in &cases {
        let mut values = base_values.clone();
        merge(&mut values, &case.values);
        let mut mesh = base_mesh.clone();
        merge(&mut mesh, &case.mesh);
        let cfg = InjectorConfig {
            values,
            mesh,
            ..Default::default()
        };
        let inputs = yaml(&d.join("inject").join(&case.input));
        let wants = if case.want.is_empty() {
            inputs.clone()
        } else {
            yaml(&d.join("inject").join(&case.want))
        };
        assert_eq!(inputs.len(), wants.len(), "{}", case.want);
        let cni = case.values.pointer("/pilot/cni/enabled") == Some(&json!(true));
        for (i, (input, want)) in inputs.iter().zip(&wants).enumerate() {
            let (mut pod, workload, _) = template(input);
            let (mut expected, _, _) = template(want);
            if pod.is_null() {
                // A document with no pod template (a Service in a List) passes through.
                assert_eq!(input, want, "{}: document {i}", case.want);
                continue;
            }
            let plan = match plan_in(&pod, pod_owner(&workload), None, None, &cfg, &profile) {
                Ok(p) => p,
                Err(e) => {
                    failures.push(format!("{}: {e}", case.want));
                    continue;
                }
            };
            if !plan.decision.inject {
                // Istio left it alone too: equal after the encoding part of the normaliser.
                let mut out = Vec::new();
                normalise(&mut pod, true, true, true);
                normalise(&mut expected, true, true, true);
                diff(&pod, &expected, "", &mut out);
                if !out.is_empty() {
                    failures.push(format!(
                        "{}: not injected ({}), Istio injected:\n  {}",
                        case.want,
                        plan.decision.reason,
                        out.join("\n  ")
                    ));
                }
                continue;
            }
            let ops = match (plan.patch, &case.refused) {
                (Err(e), Some(want)) if e.to_string().contains(want.as_str()) => {
                    refused += 1;
                    continue;
                }
                (Ok(_), Some(want)) => {
                    failures.push(format!(
                        "{}: injected, expected a refusal naming {want}",
                        case.want
                    ));
                    continue;
                }
                (Ok(o), None) => o,
                (Err(e), _) => {
                    failures.push(format!("{}: refused: {e}", case.want));
                    continue;
                }
            };
            // The shared, pre-serialized parts write exactly what plain Values would.
            let plain: Vec<PatchOp> = ops
                .iter()
                .map(|o| PatchOp {
                    value: Json::Value(o.value.to_value()),
                    ..o.clone()
                })
                .collect();
            assert_eq!(
                serde_json::to_string(&ops).expect("JSON"),
                serde_json::to_string(&plain).expect("JSON"),
                "{}",
                case.want
            );
            apply_patch(&mut pod, &ops).unwrap_or_else(|e| panic!("{}: {e}", case.want));
            for (who, p) in [("podwire's", &pod), ("Istio's", &expected)] {
                if let Err(e) = survives_the_api_types(p) {
                    failures.push(format!("{}: {who} pod {e}", case.want));
                }
            }
            // podwire-cni's view of the pod as injected: a sidecar in REDIRECT mode is
            // redirected, a gateway (Istio's `proxy router`) or another mode is not.
            let info: PodInfo = serde_json::from_value(pod.clone()).expect("pod info");
            let redirect = mesh_decision(&info, &profile, &[]);
            let mode = info.annotation("sidecar.istio.io/interceptionMode");
            // Istio's own output says which template it rendered: a gateway runs `proxy
            // router`, a proxyless gRPC agent (grpc-agent) runs without Envoy.
            let gateway = istio_args(&expected).get(1).and_then(Value::as_str) == Some("router");
            let proxyless = istio_proxy(&expected)
                .and_then(|c| c["env"].as_array())
                .into_iter()
                .flatten()
                .any(|e| e["name"] == "DISABLE_ENVOY" && e["value"] == "true");
            assert_eq!(
                redirect.is_redirect(),
                !gateway && !proxyless && matches!(mode, None | Some("REDIRECT")),
                "{}: {redirect:?}",
                case.want
            );
            let proxy_in = |p: &Value, list: &str| {
                p["spec"][list]
                    .as_array()
                    .and_then(|l| l.iter().find(|c| c["name"] == "istio-proxy"))
                    .cloned()
            };
            let Some(istio_proxy) =
                proxy_in(&expected, "initContainers").or_else(|| proxy_in(&expected, "containers"))
            else {
                failures.push(format!("{}: injected, Istio did not", case.want));
                continue;
            };
            let istio_seccomp = istio_proxy
                .pointer("/securityContext/seccompProfile")
                .is_some();
            if istio_proxy.get("restartPolicy").is_some() {
                native += 1;
            } else {
                classic += 1;
            }
            normalise(&mut pod, false, cni, istio_seccomp);
            normalise(&mut expected, true, cni, istio_seccomp);
            let mut out = Vec::new();
            for part in ["metadata", "spec"] {
                diff(&pod[part], &expected[part], &format!("/{part}"), &mut out);
            }
            if !out.is_empty() {
                failures.push(format!(
                    "{} (document {i}) from {}:\n  {}",
                    case.want,
                    case.input,
                    out.join("\n  ")
                ));
            }
        }
    }
    assert!(
        native >= 5 && classic >= 5,
        "both layouts: {native} native, {classic} classic"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    let expected_refusals = cases.iter().filter(|c| c.refused.is_some()).count();
    assert_eq!(refused, expected_refusals, "every refusal case was refused");
}
