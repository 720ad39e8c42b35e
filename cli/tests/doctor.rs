//! `podwire doctor`, run as the real binary against the in-process API server: a healthy
//! cluster where every check passes, then one scenario per cause that turns exactly that
//! check red, then the same cluster repaired, green again.

use base64::Engine as _;
use podwire_lab::apiserver::ApiServer;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;

const ALL: [&str; 14] = [
    "system-namespace",
    "host-network",
    "namespace-selector",
    "default-policy",
    "pod-annotation",
    "ca-bundle",
    "injector-endpoints",
    "cert-expiry",
    "webhook-failure-policy",
    "apiserver-proxy",
    "node-agent",
    "resource-quota",
    "pod-security",
    "rbac",
];

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/doctor")
        .join(name)
        .to_str()
        .expect("utf-8 path")
        .to_string()
}

/// The API path of an object, as the server stores it.
fn path_of(obj: &Value) -> String {
    let api_version = obj["apiVersion"].as_str().expect("apiVersion");
    let kind = obj["kind"].as_str().expect("kind");
    let name = obj["metadata"]["name"].as_str().expect("name");
    let plural = match kind {
        "Endpoints" => "endpoints".to_string(),
        "PodDisruptionBudget" => "poddisruptionbudgets".to_string(),
        k => format!("{}s", k.to_lowercase()),
    };
    let base = if api_version == "v1" {
        "/api/v1".to_string()
    } else {
        format!("/apis/{api_version}")
    };
    match obj["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{base}/namespaces/{ns}/{plural}/{name}"),
        None => format!("{base}/{plural}/{name}"),
    }
}

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    let cert = p.self_signed(&key).expect("ca");
    Ca { cert, key }
}

/// (tls.crt, tls.key) for the injector's Service name, signed by `ca`; `dates` = (not
/// before, not after) as (y, m, d).
/// A calendar day (year, month, day).
type Ymd = (i32, u8, u8);

fn serving(ca: &Ca, dates: Option<(Ymd, Ymd)>) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(vec![
        "podwire-injector.podwire-system.svc".to_string(),
        "podwire-injector.podwire-system.svc.cluster.local".to_string(),
    ])
    .expect("params");
    p.distinguished_name
        .push(DnType::CommonName, "podwire-injector.podwire-system.svc");
    if let Some(((y1, m1, d1), (y2, m2, d2))) = dates {
        p.not_before = rcgen::date_time_ymd(y1, m1, d1);
        p.not_after = rcgen::date_time_ymd(y2, m2, d2);
    }
    let cert = p.signed_by(&key, &ca.cert, &ca.key).expect("sign");
    (cert.pem(), key.serialize_pem())
}

fn secret(ca: &Ca, tls: &(String, String)) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret",
           "metadata": {"name": "podwire-injector-tls", "namespace": "podwire-system"},
           "type": "kubernetes.io/tls",
           "data": {"tls.crt": b64(&tls.0), "tls.key": b64(&tls.1),
                    "ca.crt": b64(&ca.cert.pem()), "ca.key": b64(&ca.key.serialize_pem())}})
}

fn app_pod(name: &str, ns: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "labels": {"app": "web"}},
           "spec": {
               "nodeName": "node-1",
               "securityContext": {"runAsNonRoot": true, "runAsUser": 1000,
                                   "seccompProfile": {"type": "RuntimeDefault"}},
               "containers": [{"name": "app", "image": "registry.example/web:1",
                               "securityContext": {"allowPrivilegeEscalation": false,
                                                   "capabilities": {"drop": ["ALL"]}}}]}})
}

fn node(ready: bool, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"},
           "status": {"conditions": [
               {"type": "Ready", "status": "True"},
               {"type": "PodwireReady", "status": if ready { "True" } else { "False" },
                "reason": if ready { "PodwireReady" } else { "PodwireNotReady" },
                "message": message}]}})
}

fn apiserver_pod(no_proxy: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "kube-apiserver-cp1", "namespace": "kube-system",
                        "labels": {"component": "kube-apiserver", "tier": "control-plane"}},
           "spec": {"nodeName": "cp1", "hostNetwork": true, "containers": [{
               "name": "kube-apiserver", "image": "registry.k8s.io/kube-apiserver:v1.33.0",
               "env": [{"name": "HTTPS_PROXY", "value": "http://proxy.example:3128"},
                       {"name": "NO_PROXY", "value": no_proxy}]}]}})
}

fn quota(used_cpu: &str) -> Value {
    let hard = json!({"requests.cpu": "4", "requests.memory": "8Gi",
                      "limits.cpu": "8", "limits.memory": "16Gi"});
    json!({"apiVersion": "v1", "kind": "ResourceQuota",
           "metadata": {"name": "compute", "namespace": "shop"},
           "spec": {"hard": hard},
           "status": {"hard": hard,
                      "used": {"requests.cpu": used_cpu, "requests.memory": "1Gi",
                               "limits.cpu": "2", "limits.memory": "2Gi"}}})
}

fn endpoints(ready: bool) -> Value {
    let addr =
        json!([{"ip": "10.244.0.7", "targetRef": {"kind": "Pod", "name": "podwire-injector-0"}}]);
    let subset = if ready {
        json!({"addresses": addr, "ports": [{"name": "https", "port": 15017}]})
    } else {
        json!({"notReadyAddresses": addr, "ports": [{"name": "https", "port": 15017}]})
    };
    json!({"apiVersion": "v1", "kind": "Endpoints",
           "metadata": {"name": "podwire-injector", "namespace": "podwire-system"},
           "subsets": [subset]})
}

/// A cluster with podwire installed from install/podwire.yaml and everything healthy.
struct Lab {
    api: ApiServer,
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    baseline: BTreeMap<String, Value>,
    changed: Vec<String>,
    ca: Ca,
}

const MWC: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/podwire-sidecar-injector";
const CM: &str = "/api/v1/namespaces/podwire-system/configmaps/podwire-injector";
const SECRET: &str = "/api/v1/namespaces/podwire-system/secrets/podwire-injector-tls";
const SHOP: &str = "/api/v1/namespaces/shop";
const WEB: &str = "/api/v1/namespaces/shop/pods/web";

impl Lab {
    fn new() -> Lab {
        let api = ApiServer::start().expect("API server");
        let dir = tempfile::tempdir().expect("tempdir");
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig, &api.token)
            .expect("kubeconfig");
        let ca = ca("podwire-injector-ca");
        let tls = serving(&ca, None);
        let mut objs: Vec<Value> = Vec::new();
        let install = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../install/podwire.yaml"),
        )
        .expect("install/podwire.yaml");
        for de in serde_yaml_ng::Deserializer::from_str(&install) {
            let v: Value = serde::Deserialize::deserialize(de).expect("yaml");
            if !v.is_null() {
                objs.push(v);
            }
        }
        for o in objs.iter_mut() {
            if o["kind"] == "MutatingWebhookConfiguration" {
                o["webhooks"][0]["clientConfig"]["caBundle"] = json!(b64(&ca.cert.pem()));
            }
        }
        objs.push(secret(&ca, &tls));
        objs.push(endpoints(true));
        objs.push(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop",
            "labels": {"istio-injection": "enabled",
                       "pod-security.kubernetes.io/enforce": "restricted"}}}),
        );
        objs.push(app_pod("web", "shop"));
        objs.push(node(
            true,
            "podwire-cni is installed and the pod cache is synced",
        ));
        objs.push(apiserver_pod("127.0.0.1,localhost,.svc,10.96.0.0/12"));
        objs.push(quota("1"));
        let mut baseline = BTreeMap::new();
        for o in objs {
            let p = path_of(&o);
            api.put(&p, o.clone());
            baseline.insert(p, o);
        }
        Lab {
            api,
            _dir: dir,
            kubeconfig,
            baseline,
            changed: Vec::new(),
            ca,
        }
    }

    fn put(&mut self, path: &str, obj: Value) {
        self.api.put(path, obj);
        self.changed.push(path.to_string());
    }

    /// A copy of a baseline object, changed by `f`, stored in place.
    fn edit(&mut self, path: &str, f: impl FnOnce(&mut Value)) {
        let mut obj = self.baseline.get(path).cloned().expect("baseline object");
        f(&mut obj);
        self.put(path, obj);
    }

    /// Back to the healthy cluster.
    fn reset(&mut self) {
        for p in std::mem::take(&mut self.changed) {
            match self.baseline.get(&p) {
                Some(o) => {
                    self.api.put(&p, o.clone());
                }
                None => self.api.delete(&p),
            }
        }
    }

    /// (exit code, stdout, stderr)
    fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_podwire"))
            .arg("doctor")
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .output()
            .expect("run podwire");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!stderr.contains("panicked"), "{stderr}");
        (
            out.status.code().expect("exit code"),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr,
        )
    }

    /// The JSON report and the exit code.
    fn report(&self, args: &[&str]) -> (i32, Value) {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let (code, stdout, stderr) = self.run(&a);
        let v: Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}\n{stderr}"));
        (code, v)
    }

    /// Ids of the checks with `status`.
    fn with_status(report: &Value, status: &str) -> Vec<String> {
        report["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .filter(|c| c["status"] == status)
            .map(|c| c["id"].as_str().expect("id").to_string())
            .collect()
    }

    fn check<'a>(report: &'a Value, id: &str) -> &'a Value {
        report["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .find(|c| c["id"] == id)
            .expect("check present")
    }

    /// Exactly `id` fails (exit 1); the returned check carries evidence and fix.
    fn only_fails(&self, args: &[&str], id: &str) -> Value {
        let (code, r) = self.report(args);
        assert_eq!(Lab::with_status(&r, "fail"), [id], "{r:#}");
        assert!(Lab::with_status(&r, "unknown").is_empty(), "{r:#}");
        assert_eq!(code, 1, "{r:#}");
        let c = Lab::check(&r, id).clone();
        assert!(c["fix"].as_str().is_some_and(|f| !f.is_empty()), "{c:#}");
        c
    }

    fn all_pass(&self, args: &[&str]) {
        let (code, r) = self.report(args);
        assert_eq!(Lab::with_status(&r, "pass").len(), ALL.len(), "{r:#}");
        assert_eq!(code, 0, "{r:#}");
        assert_eq!(r["summary"]["result"], "pass");
    }

    /// Break with `f`, expect exactly `id` red, repair, expect all green.
    fn scenario(&mut self, args: &[&str], id: &str, f: impl FnOnce(&mut Lab)) -> Value {
        f(self);
        let c = self.only_fails(args, id);
        self.reset();
        self.all_pass(args);
        c
    }
}

const WEB_ARGS: [&str; 4] = ["--pod", "web", "-n", "shop"];

fn evidence(c: &Value) -> &str {
    c["evidence"].as_str().expect("evidence")
}

fn fix(c: &Value) -> &str {
    c["fix"].as_str().expect("fix")
}

#[test]
fn a_healthy_cluster_passes_every_check() {
    let lab = Lab::new();
    let (code, r) = lab.report(&WEB_ARGS);
    let ids: Vec<&str> = r["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| c["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, ALL, "the documents' order");
    assert_eq!(Lab::with_status(&r, "pass").len(), 14, "{r:#}");
    assert_eq!(code, 0);
    assert_eq!(
        r["summary"],
        json!({"pass": 14, "fail": 0, "unknown": 0, "result": "pass"})
    );
    for c in r["checks"].as_array().expect("checks") {
        assert!(c["fix"].is_null(), "{c:#}");
        assert!(!evidence(c).is_empty(), "{c:#}");
    }
    // Human output: a header, one ✔ line per check with indented evidence, a summary.
    let (code, text, _) = lab.run(&WEB_ARGS);
    assert_eq!(code, 0);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "podwire doctor: namespace shop, Pod shop/web");
    let marks: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| !l.starts_with("    "))
        .collect();
    assert_eq!(marks.len(), 16, "{text}");
    for (line, id) in marks[1..15].iter().zip(ALL) {
        assert!(line.starts_with(&format!("✔ {id}: ")), "{line}");
    }
    assert_eq!(marks[15], "14 passed, 0 failed, 0 could not check");
}

#[test]
fn system_namespace() {
    let mut lab = Lab::new();
    // Labelled and quota-free, so only the namespace itself is the problem.
    lab.put(
        "/api/v1/namespaces/kube-system",
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": "kube-system", "labels": {"istio-injection": "enabled"}}}),
    );
    lab.put(
        "/api/v1/namespaces/kube-system/pods/web",
        app_pod("web", "kube-system"),
    );
    let c = lab.only_fails(&["--pod", "web", "-n", "kube-system"], "system-namespace");
    assert!(
        evidence(&c).contains("namespace kube-system is never injected"),
        "{c:#}"
    );
    // The fix is an application namespace: the same pod in shop passes.
    lab.all_pass(&WEB_ARGS);
}

#[test]
fn ignored_namespace() {
    let mut lab = Lab::new();
    let c = lab.scenario(&WEB_ARGS, "system-namespace", |l| {
        l.edit(CM, |cm| {
            let text = cm["data"]["config.yaml"]
                .as_str()
                .expect("config")
                .to_string();
            cm["data"]["config.yaml"] = json!(text.replace(
                "ignoredNamespaces: [podwire-system, istio-system]",
                "ignoredNamespaces: [podwire-system, istio-system, shop]"
            ));
        });
    });
    assert!(evidence(&c).contains("(ignoredNamespaces)"), "{c:#}");
    assert!(
        fix(&c).contains("remove shop from ignoredNamespaces"),
        "{c:#}"
    );
}

#[test]
fn host_network() {
    let mut lab = Lab::new();
    let c = lab.scenario(&WEB_ARGS, "host-network", |l| {
        l.edit(WEB, |p| p["spec"]["hostNetwork"] = json!(true));
    });
    assert!(evidence(&c).contains("hostNetwork: true"), "{c:#}");
}

#[test]
fn namespace_not_labelled_in_opt_in() {
    let mut lab = Lab::new();
    let c = lab.scenario(&WEB_ARGS, "namespace-selector", |l| {
        l.edit(SHOP, |n| {
            n["metadata"]["labels"]
                .as_object_mut()
                .expect("labels")
                .remove("istio-injection");
        });
    });
    assert!(
        evidence(&c).contains("istio-injection=enabled (opt-in)"),
        "{c:#}"
    );
    assert_eq!(
        fix(&c),
        "kubectl label namespace shop istio-injection=enabled --overwrite"
    );
}

#[test]
fn namespace_labelled_disabled_in_opt_out() {
    let mut lab = Lab::new();
    let opt_out = json!({"matchExpressions": [
        {"key": "istio-injection", "operator": "NotIn", "values": ["disabled"]}]});
    // Opt-out mode is the healthy baseline here: shop has istio-injection=enabled.
    lab.edit(MWC, |w| {
        w["webhooks"][0]["namespaceSelector"] = opt_out.clone()
    });
    lab.baseline
        .insert(MWC.into(), lab.api.get(MWC).expect("mwc"));
    lab.all_pass(&WEB_ARGS);
    let c = lab.scenario(&WEB_ARGS, "namespace-selector", |l| {
        l.edit(SHOP, |n| {
            n["metadata"]["labels"]["istio-injection"] = json!("disabled")
        });
    });
    assert!(evidence(&c).contains("(opt-out)"), "{c:#}");
    assert_eq!(
        fix(&c),
        "kubectl label namespace shop istio-injection=enabled --overwrite"
    );
}

#[test]
fn default_policy_typo() {
    let mut lab = Lab::new();
    let c = lab.scenario(&WEB_ARGS, "default-policy", |l| {
        l.edit(CM, |cm| {
            let text = cm["data"]["config.yaml"]
                .as_str()
                .expect("config")
                .to_string();
            cm["data"]["config.yaml"] = json!(text.replace("policy: enabled", "policy: enable"));
        });
    });
    assert!(evidence(&c).contains("\"enable\" is not a policy"), "{c:#}");
    assert!(fix(&c).contains("policy: enabled"), "{c:#}");
}

#[test]
fn annotation_on_the_deployment_metadata_only() {
    let lab = Lab::new();
    lab.all_pass(&["-f", &fixture("deployment-template.yaml")]);
    let c = lab.only_fails(
        &["-f", &fixture("deployment-metadata-only.yaml")],
        "pod-annotation",
    );
    assert!(evidence(&c).contains("metadata is ignored"), "{c:#}");
    assert!(
        fix(&c).contains("kubectl -n shop patch deployment web"),
        "{c:#}"
    );
    // Without a node, every node is checked.
    let (_, r) = lab.report(&["-f", &fixture("deployment-template.yaml")]);
    assert!(
        evidence(Lab::check(&r, "node-agent")).contains("all 1 node(s)"),
        "{r:#}"
    );
}

#[test]
fn ca_bundle_from_another_ca() {
    let mut lab = Lab::new();
    let other = ca("someone-else");
    let c = lab.scenario(&WEB_ARGS, "ca-bundle", |l| {
        l.edit(MWC, |w| {
            w["webhooks"][0]["clientConfig"]["caBundle"] = json!(b64(&other.cert.pem()))
        });
    });
    assert!(evidence(&c).contains("does NOT verify"), "{c:#}");
    assert!(
        evidence(&c).contains("podwire-injector.podwire-system.svc"),
        "{c:#}"
    );
    assert!(
        fix(&c).contains("rollout restart deployment podwire-injector"),
        "{c:#}"
    );
}

#[test]
fn empty_ca_bundle() {
    let mut lab = Lab::new();
    let c = lab.scenario(&WEB_ARGS, "ca-bundle", |l| {
        l.edit(MWC, |w| {
            w["webhooks"][0]["clientConfig"]
                .as_object_mut()
                .expect("clientConfig")
                .remove("caBundle");
        });
    });
    assert!(evidence(&c).contains("caBundle is empty"), "{c:#}");
}

#[test]
fn no_ready_endpoints() {
    let mut lab = Lab::new();
    let c = lab.scenario(&WEB_ARGS, "injector-endpoints", |l| {
        l.put(
            "/api/v1/namespaces/podwire-system/endpoints/podwire-injector",
            endpoints(false),
        );
    });
    assert!(evidence(&c).contains("0 ready, 1 not ready"), "{c:#}");
    assert!(evidence(&c).contains("no endpoints available"), "{c:#}");
}

#[test]
fn ready_endpoint_slices_count_too() {
    let mut lab = Lab::new();
    lab.put(
        "/api/v1/namespaces/podwire-system/endpoints/podwire-injector",
        endpoints(false),
    );
    lab.put(
        "/apis/discovery.k8s.io/v1/namespaces/podwire-system/endpointslices/podwire-injector-abc",
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "podwire-injector-abc", "namespace": "podwire-system",
                            "labels": {"kubernetes.io/service-name": "podwire-injector"}},
               "addressType": "IPv4",
               "endpoints": [{"addresses": ["10.244.0.7"], "conditions": {"ready": true}}]}),
    );
    lab.all_pass(&WEB_ARGS);
}

#[test]
fn expired_certificate() {
    let mut lab = Lab::new();
    let expired = serving(&lab.ca, Some(((2020, 1, 1), (2021, 1, 1))));
    let s = secret(&lab.ca, &expired);
    let c = lab.scenario(&WEB_ARGS, "cert-expiry", |l| l.put(SECRET, s));
    assert!(evidence(&c).contains("EXPIRED at 2021-01-01"), "{c:#}");
}

#[test]
fn failure_policy_ignore() {
    let mut lab = Lab::new();
    let c = lab.scenario(&WEB_ARGS, "webhook-failure-policy", |l| {
        l.edit(MWC, |w| w["webhooks"][0]["failurePolicy"] = json!("Ignore"));
    });
    assert!(
        evidence(&c).contains("pods silently start WITHOUT a proxy"),
        "{c:#}"
    );
    assert!(
        fix(&c).contains("\"path\":\"/webhooks/0/failurePolicy\",\"value\":\"Fail\""),
        "{c:#}"
    );
}

#[test]
fn webhook_timeout_30() {
    let mut lab = Lab::new();
    let c = lab.scenario(&WEB_ARGS, "webhook-failure-policy", |l| {
        l.edit(MWC, |w| w["webhooks"][0]["timeoutSeconds"] = json!(30));
    });
    assert!(evidence(&c).contains("timeoutSeconds 30"), "{c:#}");
    // No timeout at all is Kubernetes' 10s: explained, and fine.
    lab.edit(MWC, |w| {
        w["webhooks"][0]
            .as_object_mut()
            .expect("webhook")
            .remove("timeoutSeconds");
    });
    let (code, r) = lab.report(&WEB_ARGS);
    assert_eq!(code, 0, "{r:#}");
    assert!(
        evidence(Lab::check(&r, "webhook-failure-policy")).contains("the API server uses 10s"),
        "{r:#}"
    );
}

#[test]
fn apiserver_proxies_the_webhook() {
    let mut lab = Lab::new();
    let c = lab.scenario(&WEB_ARGS, "apiserver-proxy", |l| {
        l.put(
            "/api/v1/namespaces/kube-system/pods/kube-apiserver-cp1",
            apiserver_pod("127.0.0.1,localhost,10.84.100.125"),
        );
    });
    assert!(
        evidence(&c).contains("does not exempt podwire-injector.podwire-system.svc"),
        "{c:#}"
    );
    assert!(fix(&c).contains(".svc"), "{c:#}");
}

#[test]
fn node_agent_not_ready() {
    let mut lab = Lab::new();
    let msg = "podwire-cni is not chained into the primary CNI config (waiting for one?)";
    let c = lab.scenario(&WEB_ARGS, "node-agent", |l| {
        l.put("/api/v1/nodes/node-1", node(false, msg));
    });
    assert!(evidence(&c).contains(msg), "{c:#}");
    assert!(fix(&c).contains("spec.nodeName=node-1"), "{c:#}");
}

#[test]
fn quota_exhausted() {
    let mut lab = Lab::new();
    let c = lab.scenario(&WEB_ARGS, "resource-quota", |l| {
        l.put(
            "/api/v1/namespaces/shop/resourcequotas/compute",
            quota("3950m"),
        );
    });
    assert!(
        evidence(&c).contains(
            "quota compute requests.cpu: hard 4, used 3950m, the proxy needs 100m: NOT enough left"
        ),
        "{c:#}"
    );
}

#[test]
fn restricted_namespace_with_a_root_app_container() {
    let mut lab = Lab::new();
    let c = lab.scenario(&WEB_ARGS, "pod-security", |l| {
        l.edit(WEB, |p| {
            p["spec"]["containers"][0]["securityContext"]["runAsUser"] = json!(0)
        });
    });
    assert!(
        evidence(&c).contains("container app: runAsUser: 0 (root)"),
        "{c:#}"
    );
    assert!(
        !evidence(&c).contains("istio-proxy"),
        "the proxy is compliant: {c:#}"
    );
    let c = lab.scenario(&WEB_ARGS, "pod-security", |l| {
        l.edit(WEB, |p| {
            p["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = json!(true)
        });
    });
    assert!(
        evidence(&c).contains("container app: allowPrivilegeEscalation: true"),
        "{c:#}"
    );
}

#[test]
fn missing_rbac_verb() {
    let mut lab = Lab::new();
    let role = "/apis/rbac.authorization.k8s.io/v1/clusterroles/podwire-agent";
    let c = lab.scenario(&WEB_ARGS, "rbac", |l| {
        l.edit(role, |r| {
            for rule in r["rules"].as_array_mut().expect("rules") {
                if rule["resources"] == json!(["nodes/status"]) {
                    rule["verbs"] = json!(["get"]);
                }
            }
        });
    });
    assert!(
        evidence(&c).contains("system:serviceaccount:podwire-system:podwire-agent is missing"),
        "{c:#}"
    );
    assert!(
        evidence(&c).contains("(\"\" (core), nodes/status, patch)"),
        "{c:#}"
    );
    assert!(
        !evidence(&c).contains("podwire-injector is missing"),
        "{c:#}"
    );
}

#[test]
fn api_server_down_means_could_not_check_not_failed() {
    let lab = Lab::new();
    lab.api.down.store(true, Ordering::SeqCst);
    let (code, r) = lab.report(&["-f", &fixture("deployment-template.yaml")]);
    assert_eq!(code, 0, "unknown is not a failure: {r:#}");
    // What the manifest alone answers still passes; the rest could not be checked.
    assert_eq!(
        Lab::with_status(&r, "pass"),
        ["host-network", "pod-annotation"],
        "{r:#}"
    );
    assert_eq!(Lab::with_status(&r, "unknown").len(), 12, "{r:#}");
    assert_eq!(r["summary"]["result"], "incomplete");
    let (code, text, _) = lab.run(&["-f", &fixture("deployment-template.yaml")]);
    assert_eq!(code, 0);
    assert!(
        text.contains("could not check: GET namespace shop"),
        "{text}"
    );
    assert!(
        text.contains("2 passed, 0 failed, 12 could not check"),
        "{text}"
    );
    // A pod read from the cluster cannot be read either: its checks could not run.
    let (code, r) = lab.report(&WEB_ARGS);
    assert_eq!(code, 0);
    assert_eq!(Lab::with_status(&r, "unknown").len(), 14, "{r:#}");
}

#[test]
fn usage_errors_exit_2() {
    let lab = Lab::new();
    for args in [
        vec!["--pod", "web", "-f", "x.yaml"],
        vec!["-f", "/nonexistent/x.yaml"],
        vec!["-f", &fixture("configmap.yaml")],
        vec!["-o", "yaml"],
        vec!["-f", &fixture("deployment-template.yaml"), "-n", "other"],
    ] {
        let (code, stdout, stderr) = lab.run(&args);
        assert_eq!(code, 2, "{args:?}: {stdout}{stderr}");
    }
}

#[test]
fn a_missing_pod_is_could_not_check() {
    let lab = Lab::new();
    let (code, r) = lab.report(&["--pod", "nope", "-n", "shop"]);
    assert_eq!(code, 0, "{r:#}");
    let c = Lab::check(&r, "host-network");
    assert_eq!(c["status"], "unknown");
    assert!(evidence(c).contains("GET pod shop/nope: 404"), "{c:#}");
}

#[test]
fn text_output_marks_failures_and_indents_evidence_and_fix() {
    let mut lab = Lab::new();
    lab.edit(MWC, |w| w["webhooks"][0]["failurePolicy"] = json!("Ignore"));
    let (code, text, _) = lab.run(&WEB_ARGS);
    assert_eq!(code, 1, "{text}");
    if std::env::var_os("SHOW").is_some() {
        println!("{text}");
    }
    let at = text
        .find("✘ webhook-failure-policy: webhook failurePolicy and timeoutSeconds\n")
        .unwrap_or_else(|| panic!("{text}"));
    let block: Vec<&str> = text[at..]
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("    "))
        .collect();
    assert!(
        block.iter().any(|l| l.contains("failurePolicy Ignore")),
        "{text}"
    );
    assert!(
        block.iter().any(|l| l.starts_with(
            "    fix: kubectl patch mutatingwebhookconfiguration podwire-sidecar-injector"
        )),
        "{text}"
    );
    assert!(
        text.ends_with("13 passed, 1 failed, 0 could not check\n"),
        "{text}"
    );
}

#[test]
fn certificate_expiring_within_7_days() {
    let mut lab = Lab::new();
    let soon = k8s_openapi::jiff::Timestamp::now()
        .to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC)
        .date()
        .checked_add(k8s_openapi::jiff::Span::new().days(3))
        .expect("date");
    let ymd =
        |d: k8s_openapi::jiff::civil::Date| (i32::from(d.year()), d.month() as u8, d.day() as u8);
    let tls = serving(&lab.ca, Some(((2020, 1, 1), ymd(soon))));
    let s = secret(&lab.ca, &tls);
    let c = lab.scenario(&WEB_ARGS, "cert-expiry", |l| l.put(SECRET, s));
    assert!(evidence(&c).contains("renewal is overdue"), "{c:#}");
}

#[test]
fn no_kubeconfig_is_said_once_and_could_not_check() {
    let out = Command::new(env!("CARGO_BIN_EXE_podwire"))
        .args(["doctor", "-f", &fixture("deployment-template.yaml")])
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env("HOME", "/nonexistent")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("run podwire");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert_eq!(text.matches("/nonexistent/kubeconfig").count(), 1, "{text}");
    assert!(
        text.contains("2 passed, 0 failed, 12 could not check"),
        "{text}"
    );
}

#[test]
fn kubeconfig_flag_and_policy_disabled() {
    let mut lab = Lab::new();
    let kc = lab.kubeconfig.to_str().expect("utf-8").to_string();
    lab.edit(CM, |cm| {
        let text = cm["data"]["config.yaml"]
            .as_str()
            .expect("config")
            .to_string();
        cm["data"]["config.yaml"] = json!(text.replace("policy: enabled", "policy: disabled"));
    });
    // --kubeconfig wins over a KUBECONFIG that points nowhere.
    let out = Command::new(env!("CARGO_BIN_EXE_podwire"))
        .args([
            "doctor",
            "--pod",
            "web",
            "-n",
            "shop",
            "-o",
            "json",
            "--kubeconfig",
            &kc,
        ])
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .output()
        .expect("run podwire");
    let r: Value = serde_json::from_slice(&out.stdout).expect("json");
    // A pod that does not ask for the proxy under policy disabled is not injected.
    assert_eq!(Lab::with_status(&r, "fail"), ["default-policy"], "{r:#}");
    assert_eq!(out.status.code(), Some(1));
    assert!(fix(Lab::check(&r, "default-policy")).contains("sidecar.istio.io/inject: \"true\""));
    // One that asks for it is: disabled is then a choice, not a problem.
    lab.all_pass(&["-f", &fixture("deployment-template.yaml")]);
}
