//! `podwire-injector review`, run as the real binary on AdmissionReviews shaped exactly as the
//! API server sends them (tests/fixtures/*.json).

use base64::Engine;
use podwire_core::inject::{apply_patch, PatchOp};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[derive(Debug)]
struct Run {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

fn run_with(args: &[&str], stdin: &[u8]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_podwire-injector"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn podwire-injector");
    // A run that refuses its arguments exits before reading stdin: a broken pipe is fine.
    let _ = child.stdin.take().expect("stdin").write_all(stdin);
    let out = child.wait_with_output().expect("wait");
    Run {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `review --config tests/fixtures/config.yaml [extra]` on a fixture; the answer's `response`.
fn review(name: &str, extra: &[&str]) -> Value {
    let config = fixture("config.yaml");
    let mut args = vec!["review", "--config", config.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    let body = std::fs::read(fixture(name)).expect("fixture");
    let r = run_with(&args, &body);
    assert!(r.status.success(), "{name}: {}", r.stderr);
    assert!(
        r.stdout.ends_with('\n') && r.stdout.lines().count() == 1,
        "{:?}",
        r.stdout
    );
    let answer: Value = serde_json::from_str(&r.stdout).expect("answer is JSON");
    assert_eq!(
        answer["apiVersion"],
        json!("admission.k8s.io/v1"),
        "{answer}"
    );
    assert_eq!(answer["kind"], json!("AdmissionReview"), "{answer}");
    assert!(answer.get("request").is_none(), "{answer}");
    answer["response"].clone()
}

fn request_uid(name: &str) -> Value {
    let v: Value = serde_json::from_slice(&std::fs::read(fixture(name)).expect("fixture"))
        .expect("fixture JSON");
    v["request"]["uid"].clone()
}

fn patch_of(resp: &Value) -> Vec<PatchOp> {
    assert_eq!(resp["patchType"], json!("JSONPatch"), "{resp}");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(resp["patch"].as_str().expect("patch string"))
        .expect("base64");
    serde_json::from_slice(&raw).expect("RFC 6902 patch")
}

fn warnings(resp: &Value) -> Vec<String> {
    resp.get("warnings")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

fn assert_unchanged(resp: &Value) {
    assert_eq!(resp["allowed"], json!(true), "{resp}");
    assert!(
        resp.get("patch").is_none() && resp.get("patchType").is_none(),
        "{resp}"
    );
    assert!(resp.get("status").is_none(), "{resp}");
}

#[test]
fn controller_pod_with_generate_name_only_is_injected() {
    let resp = review("controller-pod.json", &[]);
    assert_eq!(resp["uid"], request_uid("controller-pod.json"));
    assert_eq!(resp["allowed"], json!(true));
    assert!(warnings(&resp).is_empty(), "{resp}");
    let ops = patch_of(&resp);

    let body: Value =
        serde_json::from_slice(&std::fs::read(fixture("controller-pod.json")).expect("fixture"))
            .expect("json");
    let mut pod = body["request"]["object"].clone();
    apply_patch(&mut pod, &ops).expect("the patch applies to the pod as sent");
    // Istio's sidecar in the native layout (the default): the first init container, with
    // the full template (args, env, volumes) and the config file's resources.
    let containers = pod["spec"]["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let inits = pod["spec"]["initContainers"]
        .as_array()
        .expect("init containers");
    assert_eq!(inits.len(), 1);
    let proxy = &inits[0];
    assert_eq!(proxy["name"], json!("istio-proxy"));
    assert_eq!(proxy["restartPolicy"], json!("Always"));
    assert_eq!(proxy["resources"]["limits"]["cpu"], json!("2"));
    assert_eq!(proxy["args"][0], json!("proxy"));
    let env = |name: &str| {
        proxy["env"]
            .as_array()
            .and_then(|e| e.iter().find(|v| v["name"] == name))
            .cloned()
            .unwrap_or(Value::Null)
    };
    // The workload is the ReplicaSet's Deployment, as Istio derives it.
    assert_eq!(env("ISTIO_META_WORKLOAD_NAME")["value"], json!("web"));
    assert!(env("POD_NAMESPACE")["valueFrom"].is_object());
    let ann = &pod["metadata"]["annotations"];
    assert!(ann["sidecar.istio.io/status"].is_string(), "{ann}");
    assert_eq!(ann["example.com/injected-by"], json!("podwire"));
    assert_eq!(
        ann["traffic.sidecar.istio.io/includeOutboundIPRanges"],
        json!("*")
    );
    // The webhook does not invent a name or move the namespace into the object.
    assert!(pod["metadata"].get("name").is_none());
    assert!(pod["metadata"].get("namespace").is_none());
    // Labels, annotations, the init containers and volumes: nothing else is touched.
    let paths: Vec<&str> = ops.iter().map(|o| o.path.as_str()).collect();
    assert!(
        paths.iter().all(|p| p.starts_with("/metadata/labels")
            || p.starts_with("/metadata/annotations")
            || *p == "/spec/containers"
            || *p == "/spec/initContainers"
            || *p == "/spec/volumes"),
        "{paths:?}"
    );
}

#[test]
fn selected_namespace_labels_change_nothing() {
    let with = review(
        "controller-pod.json",
        &["--namespace-labels", "istio-injection=enabled,team=shop"],
    );
    assert_eq!(with, review("controller-pod.json", &[]));
}

#[test]
fn kube_system_is_untouched() {
    let resp = review("kube-system.json", &[]);
    assert_eq!(resp["uid"], request_uid("kube-system.json"));
    assert_unchanged(&resp);
    let w = warnings(&resp);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("namespace kube-system is never injected"),
        "{w:?}"
    );
}

#[test]
fn host_network_with_inject_true_warns() {
    let resp = review("hostnetwork-inject-true.json", &[]);
    assert_unchanged(&resp);
    assert_eq!(
        warnings(&resp),
        vec!["podwire: annotation sidecar.istio.io/inject=\"true\" is ignored: pods with hostNetwork are never injected"]
    );
}

#[test]
fn already_injected_gets_no_patch() {
    let resp = review("already-injected.json", &[]);
    assert_eq!(resp["uid"], request_uid("already-injected.json"));
    assert_unchanged(&resp);
    assert!(warnings(&resp).is_empty(), "{resp}");
}

#[test]
fn malformed_body_gets_a_clean_answer() {
    for body in [
        std::fs::read(fixture("malformed.json")).expect("fixture"),
        b"".to_vec(),
        b"not json at all".to_vec(),
        b"{\"apiVersion\":\"v1\",\"kind\":\"Pod\"}".to_vec(),
        vec![0xff, 0xfe, 0x00],
    ] {
        let config = fixture("config.yaml");
        let r = run_with(
            &["review", "--config", config.to_str().expect("path")],
            &body,
        );
        assert!(r.status.success(), "{}", r.stderr);
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
        let answer: Value = serde_json::from_str(&r.stdout).expect("answer is JSON");
        let resp = &answer["response"];
        assert_eq!(resp["allowed"], json!(false), "{answer}");
        assert_eq!(resp["status"]["code"], json!(400), "{answer}");
        assert!(
            resp["status"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("podwire-injector: ")),
            "{answer}"
        );
        assert!(resp["uid"].is_string(), "{answer}");
    }
}

#[test]
fn non_pod_kind_is_allowed_unchanged_with_a_warning() {
    let resp = review("deployment.json", &[]);
    assert_eq!(resp["uid"], request_uid("deployment.json"));
    assert_unchanged(&resp);
    let w = warnings(&resp);
    assert!(
        w.len() == 1
            && w[0].contains("only mutates Pods; apps/v1 Deployment shop/web was not changed"),
        "{w:?}"
    );
}

#[test]
fn dry_run_gets_the_same_answer() {
    let dry = review("dry-run.json", &[]);
    let mut real = review("controller-pod.json", &[]);
    assert_eq!(dry["uid"], request_uid("dry-run.json"));
    real["uid"] = dry["uid"].clone();
    assert_eq!(dry, real);
}

#[test]
fn bad_annotations_are_refused_naming_them() {
    for (name, key, value) in [
        (
            "bad-annotation.json",
            "traffic.sidecar.istio.io/excludeInboundPorts",
            "8080;reboot",
        ),
        ("bad-quantity.json", "sidecar.istio.io/proxyMemory", "lots"),
    ] {
        let resp = review(name, &[]);
        assert_eq!(resp["uid"], request_uid(name));
        assert_eq!(resp["allowed"], json!(false), "{resp}");
        assert!(resp.get("patch").is_none());
        assert_eq!(resp["status"]["code"], json!(422));
        let msg = resp["status"]["message"].as_str().expect("message");
        assert!(
            msg.contains(key)
                && msg.contains(&format!("{value:?}"))
                && msg.contains("fix or remove"),
            "{msg}"
        );
    }
}

/// A traffic annotation over the length limit made of multibyte characters: refused with a
/// 422 like any bad value. Cutting its quoted start at byte 64 used to land inside a
/// character and panic, which aborts a serving injector (`panic = "abort"`) on one CREATE.
#[test]
fn an_overlong_multibyte_annotation_is_refused_not_a_crash() {
    let key = "traffic.sidecar.istio.io/excludeInboundPorts";
    let mut body: Value =
        serde_json::from_slice(&std::fs::read(fixture("bad-annotation.json")).expect("fixture"))
            .expect("fixture JSON");
    body["request"]["object"]["metadata"]["annotations"][key] = json!("€".repeat(2000));
    let config = fixture("config.yaml");
    let r = run_with(
        &["review", "--config", config.to_str().expect("utf-8 path")],
        &serde_json::to_vec(&body).expect("JSON"),
    );
    assert!(r.status.success(), "{r:?}");
    let resp = &serde_json::from_str::<Value>(&r.stdout).expect("answer")["response"];
    assert_eq!(resp["allowed"], json!(false), "{resp}");
    assert_eq!(resp["status"]["code"], json!(422), "{resp}");
    let msg = resp["status"]["message"].as_str().expect("message");
    assert!(
        msg.contains(key) && msg.contains("longer than 4096 bytes") && msg.contains("€"),
        "{msg}"
    );
}

#[test]
fn inject_true_in_an_unselected_namespace_warns() {
    // Without namespace labels the API server has selected the namespace: injected.
    let resp = review("inject-true.json", &[]);
    assert!(resp["patch"].is_string(), "{resp}");
    // With them, the namespaceSelector is checked here too.
    for labels in ["", "team=legacy", "istio-injection=disabled"] {
        let resp = review("inject-true.json", &["--namespace-labels", labels]);
        assert_unchanged(&resp);
        let w = warnings(&resp);
        assert!(
            w.len() == 1
                && w[0].contains(
                    "sidecar.istio.io/inject=\"true\" is ignored: namespace legacy is not selected"
                ),
            "{labels:?}: {w:?}"
        );
    }
}

#[test]
fn updates_are_allowed_unchanged() {
    let resp = review("update.json", &[]);
    assert_eq!(resp["uid"], request_uid("update.json"));
    assert_unchanged(&resp);
    assert!(warnings(&resp).is_empty());
}

#[test]
fn bad_config_or_labels_fail_before_answering() {
    let dir = std::env::temp_dir().join(format!("podwire-review-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "proxy:\n  uid: 0\n").expect("write");
    let body = std::fs::read(fixture("controller-pod.json")).expect("fixture");
    let r = run_with(&["review", "--config", bad.to_str().expect("path")], &body);
    assert!(!r.status.success());
    assert!(r.stdout.is_empty());
    assert!(
        r.stderr.contains("bad.yaml") && r.stderr.contains("proxy.uid"),
        "{}",
        r.stderr
    );

    let missing = dir.join("missing.yaml");
    let r = run_with(
        &["review", "--config", missing.to_str().expect("path")],
        &body,
    );
    assert!(
        !r.status.success() && r.stderr.contains("missing.yaml"),
        "{}",
        r.stderr
    );

    let config = fixture("config.yaml");
    let r = run_with(
        &[
            "review",
            "--config",
            config.to_str().expect("path"),
            "--namespace-labels",
            "oops",
        ],
        &body,
    );
    assert!(
        !r.status.success() && r.stderr.contains("--namespace-labels"),
        "{}",
        r.stderr
    );
    let _ = std::fs::remove_dir_all(&dir);
}
