//! Golden comparisons against Istio's own injection fixtures (pkg/kube/inject/testdata/inject
//! at the commit named in testdata/istio/NOTICE): each input goes through podwire's injection
//! with the values and mesh config Istio's TestInjection uses for it, and the result must equal
//! Istio's output after this normaliser, applied to both sides where it says so:
//!
//! 1. Istio's `istio-init` / `istio-validation` init containers are dropped from the expected
//!    pod, from the `initContainers` list of its `sidecar.istio.io/status` and from its
//!    `proxy.istio.io/overrides` (podwire adds no init container: podwire-cni programs the
//!    redirection; a pod's own customisation of them is dropped with a warning).
//! 2. Against a fixture rendered without istio-cni (`*.injected`, no
//!    `sidecar.istio.io/interceptionMode` annotation) the annotations podwire-cni reads
//!    (`sidecar.istio.io/interceptionMode`, `traffic.sidecar.istio.io/*`) are dropped from
//!    podwire's pod: Istio writes them only for its CNI, and podwire is always the CNI.
//! 3. The proxy's `seccompProfile: RuntimeDefault`, which podwire adds so a restricted pod stays
//!    restricted, is dropped from podwire's pod when Istio's has none.
//! 4. Encoding only: a volume with no source is `emptyDir: {}` (the API server's default);
//!    quantities compare by value (`2000m` = `2`); JSON carried in strings (`PROXY_CONFIG`,
//!    `ISTIO_KUBE_APP_PROBERS`, `ISTIO_PROMETHEUS_ANNOTATIONS`, the status and overrides
//!    annotations) compares as JSON; `resources: {}` and `creationTimestamp: null`, which Go
//!    writes for empty fields, are dropped.

use podwire_core::inject::json::Json;
use podwire_core::inject::quantity::Quantity;
use podwire_core::inject::{apply_patch, plan_in, InjectorConfig, PatchOp, Workload};
use podwire_core::MeshProfile;
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
        .collect()
}

#[derive(Debug, Deserialize)]
struct Case {
    #[serde(rename = "in")]
    input: String,
    want: String,
    #[serde(default)]
    values: Value,
    #[serde(default)]
    mesh: Value,
}

fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
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
        if !expected && !cni {
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
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for k in x.keys().chain(y.keys().filter(|k| !x.contains_key(*k))) {
                diff(
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    &format!("{path}/{k}"),
                    out,
                );
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                diff(p, q, &format!("{path}/{i}"), out);
            }
        }
        _ if a != b => out.push(format!("{path}:\n   podwire: {a}\n   istio:   {b}")),
        _ => {}
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
    let (mut native, mut classic, mut failures) = (0, 0, Vec::new());
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
        let wants = yaml(&d.join("inject").join(&case.want));
        assert_eq!(inputs.len(), wants.len(), "{}", case.want);
        for (i, (input, want)) in inputs.iter().zip(&wants).enumerate() {
            let (mut pod, workload, _) = template(input);
            let (mut expected, _, _) = template(want);
            let plan = plan_in(&pod, Some(&workload), None, None, &cfg, &profile)
                .unwrap_or_else(|e| panic!("{}: {e}", case.want));
            assert!(
                plan.decision.inject,
                "{}: {}",
                case.want, plan.decision.reason
            );
            let ops = plan
                .patch
                .unwrap_or_else(|e| panic!("{}: refused: {e}", case.want));
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
            let cni = expected
                .pointer("/metadata/annotations/sidecar.istio.io~1interceptionMode")
                .is_some();
            let proxy_in = |p: &Value, list: &str| {
                p["spec"][list]
                    .as_array()
                    .and_then(|l| l.iter().find(|c| c["name"] == "istio-proxy"))
                    .cloned()
            };
            let istio_proxy = proxy_in(&expected, "initContainers")
                .or_else(|| proxy_in(&expected, "containers"))
                .expect("istio's proxy");
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
}
