//! The injector against pods built from Istio's vocabulary (the annotations and labels its
//! template reads, the container names it treats specially, hostile values), checking what
//! must hold for every answer:
//!
//! 1. an AdmissionReview answer for the request's uid, never a panic;
//! 2. a patch is base64 of an RFC 6902 patch that applies to the object as sent (checked with
//!    the `json-patch` crate, not podwire's own applier);
//! 3. an injected pod is redirected: podwire-cni's reading of the patched pod (`PodInfo`,
//!    `mesh_decision`, `RedirectSpec::from_pod`) redirects it, unless it is a pod the plugin
//!    leaves alone by design (a gateway, proxyless gRPC) or the answer says so (a warned
//!    non-REDIRECT interception mode or proxyless proxy); and a grpc-agent pod it would
//!    redirect (its Envoy switched back on) is warned about;
//! 4. the injected pod reviewed again is left as it is (no second proxy).

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use podwire_core::inject::{InjectorConfig, Labels};
use podwire_core::{mesh_decision, MeshProfile, PodInfo, RedirectSpec};
use serde_json::{json, Map, Value};
use std::sync::OnceLock;

/// Annotation and label keys Istio's injection reads; podwire-cni's traffic keys are added
/// from its profile ([`keys`]).
const KEYS: &[&str] = &[
    "sidecar.istio.io/inject",
    "sidecar.istio.io/status",
    "sidecar.istio.io/interceptionMode",
    "sidecar.istio.io/nativeSidecar",
    "sidecar.istio.io/proxyImage",
    "sidecar.istio.io/proxyImageType",
    "sidecar.istio.io/proxyCPU",
    "sidecar.istio.io/proxyMemory",
    "sidecar.istio.io/proxyCPULimit",
    "sidecar.istio.io/proxyMemoryLimit",
    "sidecar.istio.io/userVolume",
    "sidecar.istio.io/userVolumeMount",
    "sidecar.istio.io/rewriteAppHTTPProbers",
    "sidecar.istio.io/logLevel",
    "sidecar.istio.io/componentLogLevel",
    "sidecar.istio.io/agentLogLevel",
    "sidecar.istio.io/bootstrapOverride",
    "sidecar.istio.io/discoveryAddress",
    "sidecar.istio.io/statsInclusionPrefixes",
    "sidecar.istio.io/enableCoreDump",
    "proxy.istio.io/config",
    "proxy.istio.io/overrides",
    "inject.istio.io/templates",
    "istio.io/rev",
    "status.sidecar.istio.io/port",
    "readiness.status.sidecar.istio.io/applicationPorts",
    "readiness.status.sidecar.istio.io/initialDelaySeconds",
    "readiness.status.sidecar.istio.io/periodSeconds",
    "readiness.status.sidecar.istio.io/failureThreshold",
    "traffic.sidecar.istio.io/kubevirtInterfaces",
    "prometheus.io/scrape",
    "prometheus.io/port",
    "prometheus.io/path",
    "prometheus.istio.io/merge-metrics",
    "kubectl.kubernetes.io/default-container",
    "security.istio.io/tlsMode",
    "service.istio.io/canonical-name",
    "service.istio.io/canonical-revision",
    "app",
    "app.kubernetes.io/name",
    "version",
    "openshift.io/build.name",
];

/// Values worth trying for any key: Istio's spellings, edge cases, hostile text.
const VALUES: &[&str] = &[
    "true",
    "false",
    "True",
    "1",
    "",
    " ",
    "REDIRECT",
    "TPROXY",
    "NONE",
    "redirect",
    "*",
    "15001",
    "15006",
    "15020",
    "15021",
    "15090",
    "80,8080",
    "0",
    "65535",
    "65536",
    "-1",
    "10.0.0.0/8",
    "10.0.0.0/8,192.168.0.0/16",
    "0.0.0.0/0",
    "::/0",
    "fd00::/8",
    "1.2.3.4/33",
    "eth0",
    "net1,net2",
    "sidecar",
    "gateway",
    "sidecar,gateway",
    "grpc-agent",
    "grpc-agent,sidecar",
    "grpc-simple",
    "custom",
    "canary",
    "default",
    "100m",
    "1Gi",
    "2",
    "debug",
    "misc:error",
    "{\"sidecar.istio.io/status\":\"x\"}",
    "{\"containers\":[\"istio-proxy\"]}",
    "holdApplicationUntilProxyStarts: true",
    "interceptionMode: TPROXY",
    "concurrency: 2\nproxyMetadata:\n  DISABLE_ENVOY: \"true\"",
    "{\"name\":\"v\",\"emptyDir\":{}}",
    "[{\"name\":\"v\",\"mountPath\":\"/v\"}]",
    "80\n-j ACCEPT",
    "80; rm -rf /",
    "$(id)",
    "a\u{0}b",
    "web",
    "web-v1",
];

const NAMES: &[&str] = &[
    "app",
    "web",
    "istio-proxy",
    "istio-init",
    "istio-validation",
    "sidecar",
];

const ENV: &[&str] = &[
    "DISABLE_ENVOY",
    "ISTIO_META_INTERCEPTION_MODE",
    "PROXY_CONFIG",
    "POD_NAME",
    "FOO",
];

const NAMESPACES: &[&str] = &["shop", "kube-system", "istio-system", "default", ""];

#[derive(Arbitrary, Debug)]
enum Text {
    Known(u8),
    Free(String),
}

impl Text {
    fn get(&self, vocab: &[&str]) -> String {
        match self {
            Text::Known(i) => vocab[*i as usize % vocab.len()].to_string(),
            Text::Free(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Container {
    name: Text,
    image: Option<Text>,
    args: Vec<Text>,
    env: Vec<(Text, Text)>,
    ports: Vec<(i32, Option<Text>)>,
    run_as_user: Option<i64>,
    run_as_group: Option<i64>,
    restart_always: bool,
    probe_port: Option<i32>,
}

impl Container {
    fn json(&self) -> Value {
        let mut c = Map::new();
        c.insert("name".into(), json!(self.name.get(NAMES)));
        if let Some(i) = &self.image {
            c.insert("image".into(), json!(i.get(&["auto", "busybox", "x:1"])));
        }
        if !self.args.is_empty() {
            let args: Vec<String> = self
                .args
                .iter()
                .map(|a| a.get(&["proxy", "sidecar", "router", "--domain", "x"]))
                .collect();
            c.insert("args".into(), json!(args));
        }
        if !self.env.is_empty() {
            let env: Vec<Value> = self
                .env
                .iter()
                .map(|(k, v)| json!({"name": k.get(ENV), "value": v.get(VALUES)}))
                .collect();
            c.insert("env".into(), json!(env));
        }
        if !self.ports.is_empty() {
            let ports: Vec<Value> = self
                .ports
                .iter()
                .map(|(p, n)| {
                    let mut port = json!({"containerPort": p});
                    if let Some(n) = n {
                        port["name"] = json!(n.get(&["http", "grpc", "tcp-x"]));
                    }
                    port
                })
                .collect();
            c.insert("ports".into(), json!(ports));
        }
        if self.run_as_user.is_some() || self.run_as_group.is_some() {
            let mut sc = Map::new();
            if let Some(u) = self.run_as_user {
                sc.insert("runAsUser".into(), json!(u));
            }
            if let Some(g) = self.run_as_group {
                sc.insert("runAsGroup".into(), json!(g));
            }
            c.insert("securityContext".into(), Value::Object(sc));
        }
        if self.restart_always {
            c.insert("restartPolicy".into(), json!("Always"));
        }
        if let Some(p) = self.probe_port {
            c.insert(
                "readinessProbe".into(),
                json!({"httpGet": {"path": "/ready", "port": p}}),
            );
        }
        Value::Object(c)
    }
}

#[derive(Arbitrary, Debug)]
struct Pod {
    config: u8,
    namespace: u8,
    namespace_labels: Option<Vec<(Text, Text)>>,
    labels: Vec<(Text, Text)>,
    annotations: Vec<(Text, Text)>,
    containers: Vec<Container>,
    init_containers: Vec<Container>,
    host_network: bool,
    node_name: Option<Text>,
    update: bool,
    dry_run: bool,
}

/// [`KEYS`] and the traffic annotations podwire-cni reads.
fn keys() -> &'static [&'static str] {
    static ALL: OnceLock<Vec<&'static str>> = OnceLock::new();
    ALL.get_or_init(|| {
        let traffic = MeshProfile::istio().traffic.all();
        KEYS.iter().copied().chain(traffic).collect()
    })
}

fn map(pairs: &[(Text, Text)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.get(keys()), json!(v.get(VALUES))))
        .collect()
}

/// The injector configs tried: the tests' fixture config in each sidecar layout, and with
/// Istio's holdApplicationUntilProxyStarts.
fn configs() -> &'static [InjectorConfig] {
    static CONFIGS: OnceLock<Vec<InjectorConfig>> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        let base = include_str!("../../webhook/tests/fixtures/config.yaml");
        [
            "",
            "values:\n  pilot:\n    env:\n      ENABLE_NATIVE_SIDECARS: \"false\"\n",
            "values:\n  global:\n    proxy:\n      holdApplicationUntilProxyStarts: true\n  pilot:\n    env:\n      ENABLE_NATIVE_SIDECARS: \"false\"\n",
        ]
        .iter()
        .map(|extra| {
            podwire_injector::parse_config(
                &format!("{base}\n{extra}"),
                "fuzz",
                &MeshProfile::istio(),
            )
            .expect("the fuzz configs load")
            .config
        })
        .collect()
    })
}

fn review_of(uid: &str, namespace: &str, object: &Value, update: bool, dry_run: bool) -> Vec<u8> {
    let review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": if update { "UPDATE" } else { "CREATE" },
            "dryRun": dry_run,
            "object": object,
        }
    });
    serde_json::to_vec(&review).expect("JSON")
}

fn check(pod: &Pod) {
    let profile = MeshProfile::istio();
    let cfg = &configs()[pod.config as usize % configs().len()];
    let namespace = NAMESPACES[pod.namespace as usize % NAMESPACES.len()];
    let mut spec = Map::new();
    spec.insert(
        "containers".into(),
        Value::Array(pod.containers.iter().map(Container::json).collect()),
    );
    if !pod.init_containers.is_empty() {
        spec.insert(
            "initContainers".into(),
            Value::Array(pod.init_containers.iter().map(Container::json).collect()),
        );
    }
    if pod.host_network {
        spec.insert("hostNetwork".into(), json!(true));
    }
    if let Some(n) = &pod.node_name {
        spec.insert("nodeName".into(), json!(n.get(&["node-a", ""])));
    }
    let object = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "web-",
            "labels": map(&pod.labels),
            "annotations": map(&pod.annotations),
        },
        "spec": spec,
    });
    let ns_labels: Option<Labels> = pod.namespace_labels.as_ref().map(|l| {
        l.iter()
            .map(|(k, v)| {
                (
                    k.get(&[
                        "istio-injection",
                        "istio.io/rev",
                        "kubernetes.io/metadata.name",
                    ]),
                    v.get(&["enabled", "disabled", "default", "canary"]),
                )
            })
            .collect()
    });
    let uid = "fuzz-uid";
    let body = review_of(uid, namespace, &object, pod.update, pod.dry_run);
    let labels_of = |_: &str| ns_labels.clone();
    let reviewed = podwire_injector::review_resolving(&body, cfg, &labels_of, &profile);

    // 1. An answer for this uid, that encodes.
    serde_json::to_vec(&reviewed.review).expect("the answer encodes");
    let response = reviewed.review.response.as_ref().expect("a response");
    assert_eq!(response.uid, uid, "the answer names the request's uid");
    let Some(patch) = &response.patch else {
        return;
    };
    assert!(response.allowed, "a patch on a denial: {response:?}");

    // 2. The patch applies to the object as sent.
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(patch)
        .expect("patch is base64");
    let ops: json_patch::Patch = serde_json::from_slice(&bytes).expect("an RFC 6902 patch");
    let mut patched = object.clone();
    json_patch::patch(&mut patched, &ops)
        .unwrap_or_else(|e| panic!("the patch does not apply: {e}\n{ops:?}\nto {object}"));

    // The API server validates after the mutating webhooks: a pod with two containers of
    // one name (across containers and initContainers) is refused there, whatever the patch.
    let names: Vec<&str> = ["containers", "initContainers"]
        .iter()
        .filter_map(|l| patched["spec"][l].as_array())
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    if (1..names.len()).any(|i| names[..i].contains(&names[i])) {
        return;
    }

    // 3. An injected pod is one the plugin redirects, or one it leaves alone by design and
    //    the answer says so.
    let status = |v: &Value| {
        v.pointer("/metadata/annotations/sidecar.istio.io~1status")
            .cloned()
    };
    if status(&patched).is_none() || status(&patched) == status(&object) {
        return;
    }
    patched["metadata"]["namespace"] = json!(namespace);
    let info: PodInfo = serde_json::from_value(patched.clone())
        .unwrap_or_else(|e| panic!("podwire-cni cannot read the injected pod: {e}\n{patched}"));
    let excluded: Vec<String> = podwire_core::mesh::DEFAULT_EXCLUDED_NAMESPACES
        .iter()
        .map(|s| s.to_string())
        .collect();
    match mesh_decision(&info, &profile, &excluded) {
        podwire_core::MeshDecision::Redirect => {
            if let Err(e) = RedirectSpec::from_pod(&info, &profile) {
                panic!("admitted a pod podwire-cni will refuse at start: {e}\n{patched}");
            }
            // A proxyless gRPC pod redirected would send the app's traffic to an Envoy
            // configured for gRPC: only with a warning.
            let grpc = info
                .annotation("inject.istio.io/templates")
                .is_some_and(|t| t.split(',').all(|n| n.trim() == "grpc-agent"));
            assert!(
                !grpc
                    || response
                        .warnings
                        .iter()
                        .any(|w| w.contains("will redirect")),
                "a grpc-agent pod redirected without a warning: {:?}\n{patched}",
                response.warnings
            );
        }
        podwire_core::MeshDecision::Refuse(e) => {
            panic!("admitted a pod podwire-cni will refuse at start: {e}\n{patched}");
        }
        podwire_core::MeshDecision::PassThrough(why) => {
            // Istio's two templates whose proxy is never fed traffic: a gateway, and
            // proxyless gRPC (grpc-agent).
            let by_design = info
                .annotation("inject.istio.io/templates")
                .is_some_and(|t| {
                    ["gateway", "grpc-agent"]
                        .iter()
                        .any(|k| t.split(',').all(|n| n.trim() == *k))
                });
            let warned = response
                .warnings
                .iter()
                .any(|w| w.contains("will not redirect") || w.contains("will not reach the proxy"));
            assert!(
                by_design || warned,
                "fail-open: injected, but podwire-cni leaves the pod alone ({why}); warnings \
                 {:?}\n{patched}",
                response.warnings
            );
        }
    }

    // 4. Injected once: the same pod again is left as it is.
    if !pod.update {
        let again = review_of(uid, namespace, &patched, false, pod.dry_run);
        let second = podwire_injector::review_resolving(&again, cfg, &labels_of, &profile);
        let r = second.review.response.expect("a response");
        assert!(
            r.patch.is_none(),
            "injected twice: {:?}\n{patched}",
            r.warnings
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    if let Ok(pod) = Pod::arbitrary(&mut u) {
        check(&pod);
    }
});
