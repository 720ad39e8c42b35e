//! With the agent unreachable, the plugin asks the API server directly (kubeconfig), over real
//! TLS verified against the kubeconfig's CA, with the kubeconfig's bearer token.

use podwire_lab::apiserver::ApiServer;
use podwire_lab::chain::{pod_args, run_podwire};
use podwire_lab::lab::pod_manifest;
use podwire_lab::{require_root, Netns};
use serde_json::{json, Value};

fn add(
    ns: &Netns,
    pod: &str,
    kubeconfig: &std::path::Path,
    state: &std::path::Path,
) -> podwire_lab::CniOutcome {
    add_with(ns, &pod_args("shop", pod), kubeconfig, state)
}

fn add_with(
    ns: &Netns,
    cni_args: &str,
    kubeconfig: &std::path::Path,
    state: &std::path::Path,
) -> podwire_lab::CniOutcome {
    let conf = json!({"cniVersion": "1.0.0", "name": "kube", "type": "podwire-cni",
        "agentSocket": "/run/podwire-test-no-agent.sock",
        "kubeconfig": kubeconfig.display().to_string(),
        "stateDir": state.display().to_string(), "logLevel": "warn",
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "198.18.0.2/24"}]}});
    run_podwire(
        "ADD",
        &ns.name,
        &ns.path(),
        cni_args,
        conf.to_string().as_bytes(),
    )
    .expect("exec")
}

#[test]
fn pods_are_found_through_the_api_server_when_the_agent_is_down() {
    if !require_root() {
        return;
    }
    let api = ApiServer::start().expect("api server");
    api.put(
        "/api/v1/namespaces/shop/pods/web",
        pod_manifest("shop", "web", true, &[]),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, &api.token)
        .expect("kubeconfig");

    let ns = Netns::new("k").expect("netns");
    let out = add(&ns, "web", &kubeconfig, dir.path());
    assert!(out.ok, "{out:?}");
    assert!(
        ns.nat_rules("iptables-save")
            .expect("save")
            .contains("ISTIO_OUTPUT"),
        "mesh pod from the API server must be redirected"
    );
    let reqs = api.requests.lock().expect("lock").clone();
    assert_eq!(
        reqs,
        vec![(
            "GET".to_string(),
            "/api/v1/namespaces/shop/pods/web".to_string(),
            format!("Bearer {}", api.token)
        )]
    );

    // 404: not a pod podwire knows; it starts untouched.
    let other = Netns::new("k").expect("netns");
    let out = add(&other, "nothere", &kubeconfig, dir.path());
    assert!(out.ok, "{out:?}");
    assert!(!other
        .nat_rules("iptables-save")
        .expect("save")
        .contains("ISTIO_"));

    // An answer that is not the pod asked for is no answer: a 200 with any JSON object, a
    // Status, another pod, a pod without a UID; and a 404 that is not the API server's
    // NotFound for this pod. Each is unknown: 11, nothing applied.
    let mut no_uid = pod_manifest("shop", "nouid", true, &[]);
    no_uid["metadata"]["uid"] = json!("");
    for (name, answer) in [
        ("empty", json!({})),
        ("status", json!({"kind": "Status", "apiVersion": "v1"})),
        (
            "list",
            json!({"kind": "PodList", "apiVersion": "v1", "items": []}),
        ),
        ("someone", pod_manifest("shop", "someone-else", true, &[])),
        ("nouid", no_uid),
    ] {
        api.put(&format!("/api/v1/namespaces/shop/pods/{name}"), answer);
        let out = add(&other, name, &kubeconfig, dir.path());
        let err: Value = serde_json::from_str(out.stdout.trim())
            .unwrap_or_else(|e| panic!("{name}: not error JSON ({e}): {out:?}"));
        assert_eq!(err["code"], 11, "{name}: {err}");
        assert!(!other
            .nat_rules("iptables-save")
            .expect("save")
            .contains("ISTIO_"));
    }
    // A kubeconfig edited one way: a path the server does not serve at all (a wrong server
    // URL, whose 404 names no pod), and plain HTTP (refused before anything is sent).
    for (what, from, to, want) in [
        (
            "wrong path",
            api.url.clone(),
            format!("{}/wrong-prefix", api.url),
            "HTTP 404",
        ),
        (
            "plain http",
            "https://".to_string(),
            "http://".to_string(),
            "not https",
        ),
    ] {
        let text = std::fs::read_to_string(&kubeconfig)
            .expect("read")
            .replace(&from, &to);
        let edited = dir.path().join("edited.kubeconfig");
        std::fs::write(&edited, text).expect("write");
        let out = add(&other, "nothere", &edited, dir.path());
        let err: Value = serde_json::from_str(out.stdout.trim()).expect("error JSON");
        assert_eq!(err["code"], 11, "{what}: {err}");
        assert!(
            err["msg"].as_str().is_some_and(|m| m.contains(want)),
            "{what}: {err}"
        );
    }

    // Issue 9, item 1: the API server has shop/web with another UID than the runtime's (the
    // pod was re-created): unknown, so failurePolicy closed fails with 11 and the runtime retries.
    let out = add_with(
        &other,
        "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web;K8S_POD_UID=uid-recreated",
        &kubeconfig,
        dir.path(),
    );
    let err: Value = serde_json::from_str(out.stdout.trim()).expect("error JSON");
    assert_eq!(err["code"], 11, "{err}");
    assert!(
        err["msg"]
            .as_str()
            .is_some_and(|m| m.contains("uid-recreated")),
        "{err}"
    );
    assert!(!other
        .nat_rules("iptables-save")
        .expect("save")
        .contains("ISTIO_"));

    // A rejected token: undeterminable, so failurePolicy closed answers "try again later".
    api.write_kubeconfig(&kubeconfig, "wrong")
        .expect("kubeconfig");
    let out = add(&other, "web", &kubeconfig, dir.path());
    let err: Value = serde_json::from_str(out.stdout.trim()).expect("error JSON");
    assert_eq!(err["code"], 11, "{err}");
    assert!(
        err["msg"].as_str().is_some_and(|m| m.contains("HTTP 401")),
        "{err}"
    );
    assert!(!other
        .nat_rules("iptables-save")
        .expect("save")
        .contains("ISTIO_"));

    // A CA that did not sign the server's certificate: refused, never trusted blindly.
    let stranger = ApiServer::start().expect("second server");
    let mut text = std::fs::read_to_string(&kubeconfig).expect("read");
    let b64 = |s: &str| base64_encode(s);
    text = text
        .replace(&b64(&api.ca_pem), &b64(&stranger.ca_pem))
        .replace("wrong", &api.token);
    std::fs::write(&kubeconfig, text).expect("write");
    let out = add(&other, "web", &kubeconfig, dir.path());
    let err: Value = serde_json::from_str(out.stdout.trim()).expect("error JSON");
    assert_eq!(err["code"], 11, "{err}");
    assert!(!other
        .nat_rules("iptables-save")
        .expect("save")
        .contains("ISTIO_"));
}

fn base64_encode(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}
