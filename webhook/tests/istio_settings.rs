//! Istio's installed settings read from the cluster (the istio-sidecar-injector ConfigMap's
//! `values`, the istio ConfigMap's `mesh`) through the real `kube` client against the
//! in-process API server: missing is an error naming the ConfigMap, a change is applied
//! without a restart, an unusable change keeps the previous config, the file's own settings
//! stay on top.

use podwire_core::inject::{plan, InjectorConfig};
use podwire_core::MeshProfile;
use podwire_injector::istio_settings::{load, watch, IstioConfigMaps, LiveConfig};
use podwire_injector::IstioSetting;
use podwire_lab::apiserver::ApiServer;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn kube_client(api: &ApiServer, dir: &std::path::Path) -> kube::Client {
    let path = dir.join("kubeconfig");
    api.write_kubeconfig(&path, &api.token).expect("kubeconfig");
    let kc = kube::config::Kubeconfig::read_from(&path).expect("read kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("config");
    kube::Client::try_from(cfg).expect("client")
}

fn configmap(name: &str, key: &str, payload: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": name, "namespace": "istio-system"},
           "data": {key: payload}})
}

const CM: &str = "/api/v1/namespaces/istio-system/configmaps";

/// The proxy image and the CA address an injected pod gets with `cfg`.
fn rendered(cfg: &InjectorConfig) -> (String, String) {
    let pod = json!({"metadata": {"name": "p", "namespace": "shop"},
                     "spec": {"containers": [{"name": "app"}]}});
    let mut out = pod.clone();
    let p = plan(&pod, None, None, cfg, &MeshProfile::istio()).expect("pod");
    podwire_core::inject::apply_patch(&mut out, &p.patch.expect("patch")).expect("applies");
    let proxy = &out["spec"]["initContainers"][0];
    let ca = proxy["env"]
        .as_array()
        .and_then(|e| e.iter().find(|v| v["name"] == "CA_ADDR"))
        .map(|v| v["value"].as_str().unwrap_or("").to_string())
        .unwrap_or_default();
    (proxy["image"].as_str().unwrap_or("").to_string(), ca)
}

#[test]
fn istio_settings_come_from_the_cluster_and_follow_it() {
    let api = ApiServer::start().expect("api");
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = kube_client(&api, dir.path()).await;
        let cms = IstioConfigMaps::new("istio-system", "");

        // Nothing installed: a start-up error that names what is missing.
        let err = load(&client, &cms).await.expect_err("missing").to_string();
        assert!(
            err.contains("istio-system/istio-sidecar-injector") && err.contains("not found"),
            "{err}"
        );
        // A revision the Role does not cover: refused, and the error says what to grant.
        api.forbid(&format!("{CM}/istio-sidecar-injector-canary"));
        let canary = IstioConfigMaps::new("istio-system", "canary");
        let err = load(&client, &canary).await.expect_err("forbidden").to_string();
        assert!(
            err.contains("istio-sidecar-injector-canary")
                && err.contains("forbidden")
                && err.contains("Role podwire-injector-istio-config"),
            "{err}"
        );

        api.put(
            &format!("{CM}/istio-sidecar-injector"),
            configmap(
                "istio-sidecar-injector",
                "values",
                r#"{"global": {"hub": "registry.example/istio", "tag": "1.31.0", "caAddress": "ca.example:15012"}}"#,
            ),
        );
        let err = load(&client, &cms).await.expect_err("mesh missing").to_string();
        assert!(err.contains("istio-system/istio"), "{err}");
        api.put(
            &format!("{CM}/istio"),
            configmap("istio", "mesh", "trustDomain: corp.example\n"),
        );
        let (values, mesh) = load(&client, &cms).await.expect("both present");

        // The file's own values win over the cluster's.
        let file: InjectorConfig =
            serde_json::from_value(json!({"values": {"global": {"caAddress": "file.example:15012"}}}))
                .expect("config");
        let live = Arc::new(
            LiveConfig::new(file, "config.yaml", Some(values), Some(mesh), MeshProfile::istio())
                .expect("valid"),
        );
        assert_eq!(
            rendered(&live.get()),
            (
                "registry.example/istio/proxyv2:1.31.0".to_string(),
                "file.example:15012".to_string()
            )
        );

        let task = tokio::spawn(watch(client.clone(), cms.clone(), IstioSetting::Values, live.clone()));
        let wait_for = |want: &'static str| {
            let live = live.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let (image, _) = rendered(&live.get());
                    if image == want {
                        return;
                    }
                    assert!(Instant::now() < deadline, "still {image}, want {want}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        // Istio is upgraded: the new tag is used without a restart.
        api.put(
            &format!("{CM}/istio-sidecar-injector"),
            configmap("istio-sidecar-injector", "values", r#"{"global": {"hub": "registry.example/istio", "tag": "1.31.1"}}"#),
        );
        wait_for("registry.example/istio/proxyv2:1.31.1").await;
        // An unusable change keeps the last good config.
        api.put(
            &format!("{CM}/istio-sidecar-injector"),
            configmap("istio-sidecar-injector", "values", r#"{"global": {"hub": "has space"}}"#),
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(rendered(&live.get()).0, "registry.example/istio/proxyv2:1.31.1");
        api.put(
            &format!("{CM}/istio-sidecar-injector"),
            configmap("istio-sidecar-injector", "values", r#"{"global": {"hub": "registry.example/istio", "tag": "1.31.2"}}"#),
        );
        wait_for("registry.example/istio/proxyv2:1.31.2").await;
        task.abort();
    });
}
