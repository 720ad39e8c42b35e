//! Golden files for the injection patch, plus what every injected pod must satisfy.
//! Inputs: tests/fixtures/inject/NAME.pod.json (and NAME.config.json when the default config
//! is not the point). `UPDATE_GOLDEN=1 cargo test -p podwire-core --test inject_patch`
//! rewrites tests/golden/inject/NAME.patch.json; review the diff.

use podwire_core::inject::{apply_patch, plan, read_pod, InjectorConfig, PatchOp, Step};
use podwire_core::{mesh_decision, Error, MeshProfile, PodInfo, RedirectSpec};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(sub)
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn config(name: &str) -> InjectorConfig {
    let path = dir("tests/fixtures/inject").join(format!("{name}.config.json"));
    if !path.exists() {
        return InjectorConfig::default();
    }
    let cfg: InjectorConfig = serde_json::from_value(read_json(&path)).expect("config shape");
    cfg.validate(&MeshProfile::istio()).expect("valid config");
    cfg
}

fn cases() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir("tests/fixtures/inject"))
        .expect("fixtures")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".pod.json").map(str::to_string)
        })
        .collect();
    names.sort();
    assert!(names.len() >= 5, "fixtures missing: {names:?}");
    names
}

/// The patch for a fixture, as the webhook computes it (request namespace `shop`).
fn patch_for(pod: &Value, cfg: &InjectorConfig) -> Vec<PatchOp> {
    let p = plan(pod, Some("shop"), None, cfg, &MeshProfile::istio()).expect("readable pod");
    assert!(p.decision.inject, "{:?}", p.decision);
    p.patch.expect("accepted")
}

#[test]
fn patches_match_golden_files() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failed = Vec::new();
    for name in cases() {
        let pod = read_json(&dir("tests/fixtures/inject").join(format!("{name}.pod.json")));
        let got = serde_json::to_value(patch_for(&pod, &config(&name))).expect("json");
        let golden = dir("tests/golden/inject").join(format!("{name}.patch.json"));
        if update {
            let text = serde_json::to_string_pretty(&got).expect("json") + "\n";
            std::fs::write(&golden, text).expect("write golden");
            continue;
        }
        // Compared as JSON values: key order is not part of the contract.
        if !golden.exists() || read_json(&golden) != got {
            failed.push(format!(
                "{name}: got\n{}",
                serde_json::to_string_pretty(&got).unwrap_or_default()
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "golden mismatch (UPDATE_GOLDEN=1 to rewrite):\n{}",
        failed.join("\n")
    );
}

#[test]
fn every_injected_pod_is_a_restricted_mesh_pod_and_injection_is_idempotent() {
    let p = MeshProfile::istio();
    for name in cases() {
        let cfg = config(&name);
        let mut pod = read_json(&dir("tests/fixtures/inject").join(format!("{name}.pod.json")));
        let ops = patch_for(&pod, &cfg);
        apply_patch(&mut pod, &ops).unwrap_or_else(|e| panic!("{name}: {e}"));

        // Istio's sidecar, native layout by default: the first init container, and no other
        // init container (podwire-cni replaces istio-init / istio-validation).
        let inits = pod["spec"]["initContainers"].as_array().expect("inits");
        assert_eq!(inits.len(), 1, "{name}");
        let proxy = &inits[0];
        assert_eq!(proxy["name"], json!("istio-proxy"), "{name}");
        assert_eq!(proxy["restartPolicy"], json!("Always"), "{name}");
        assert!(
            proxy["args"].as_array().is_some_and(|a| a[0] == "proxy"),
            "{name}"
        );
        let volumes: Vec<&str> = pod["spec"]["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .filter_map(|v| v["name"].as_str())
            .collect();
        for v in [
            "workload-socket",
            "credential-socket",
            "workload-certs",
            "istio-envoy",
            "istio-data",
            "istio-podinfo",
            "istio-token",
            "istiod-ca-cert",
            "istio-ca-crl",
        ] {
            assert!(volumes.contains(&v), "{name}: {v} missing from {volumes:?}");
        }
        assert_eq!(
            pod["metadata"]["labels"]["security.istio.io/tlsMode"],
            json!("istio"),
            "{name}"
        );

        // Pod Security "restricted", field by field.
        let sc = &proxy["securityContext"];
        assert_eq!(sc["allowPrivilegeEscalation"], json!(false), "{name}");
        assert_eq!(sc["capabilities"], json!({"drop": ["ALL"]}), "{name}");
        assert_eq!(sc["runAsNonRoot"], json!(true), "{name}");
        assert_eq!(sc["readOnlyRootFilesystem"], json!(true), "{name}");
        // seccomp RuntimeDefault on the proxy, or inherited from the pod.
        let seccomp = sc
            .get("seccompProfile")
            .or_else(|| pod.pointer("/spec/securityContext/seccompProfile"));
        assert_eq!(seccomp, Some(&json!({"type": "RuntimeDefault"})), "{name}");
        assert_ne!(sc["runAsUser"], json!(0), "{name}");
        assert!(!proxy.to_string().contains("NET_ADMIN"), "{name}");

        // The CNI plugin sees a mesh pod and accepts every annotation the injector wrote.
        let mut info: PodInfo = podwire_core::inject::patch::read_pod(&pod).expect("pod");
        info.metadata.namespace = "shop".into();
        assert!(
            mesh_decision(&info, &p, &[]).is_redirect(),
            "{name}: {:?}",
            mesh_decision(&info, &p, &[])
        );
        let spec = RedirectSpec::from_pod(&info, &p).expect("plugin accepts the annotations");
        let (uid, gid) = cfg.proxy_ids(&p);
        assert_eq!((spec.proxy_uid, spec.proxy_gid), (uid, gid), "{name}");

        // A second pass adds nothing.
        let again = plan(&pod, Some("shop"), None, &cfg, &p).expect("pod");
        assert_eq!(again.decision.step, Step::AlreadyInjected, "{name}");
        assert_eq!(again.patch, Ok(Vec::new()), "{name}");
    }
}

#[test]
fn annotation_keys_are_escaped_in_paths() {
    let pod = read_json(&dir("tests/fixtures/inject/generate-name.pod.json"));
    let ops = patch_for(&pod, &InjectorConfig::default());
    let paths: Vec<&str> = ops.iter().map(|o| o.path.as_str()).collect();
    assert!(
        paths.contains(&"/metadata/annotations/sidecar.istio.io~1status"),
        "{paths:?}"
    );
    assert!(
        paths.iter().all(|p| p.matches('/').count() == 3
            || (p.starts_with("/spec/") && p.matches('/').count() == 2)),
        "{paths:?}"
    );
    // `~` and `/` in a key the injector writes.
    let pod_c = read_json(&dir("tests/fixtures/inject/custom-config.pod.json"));
    let ops_c = patch_for(&pod_c, &config("custom-config"));
    assert!(
        ops_c
            .iter()
            .any(|o| o.path == "/metadata/annotations/example.com~1a~0b"),
        "{ops_c:?}"
    );
    let mut patched_c = pod_c.clone();
    apply_patch(&mut patched_c, &ops_c).expect("applies");
    assert_eq!(
        patched_c["metadata"]["annotations"]["example.com/a~b"],
        json!("tilde")
    );
    // The pod's own ~ and / keys are untouched.
    let mut patched = pod.clone();
    apply_patch(&mut patched, &ops).expect("applies");
    assert_eq!(
        patched["metadata"]["annotations"]["example.com/owner~team"],
        json!("payments")
    );
}

#[test]
fn a_pod_without_annotations_gets_the_whole_object() {
    for name in ["minimal", "null-annotations"] {
        let pod = read_json(&dir(&format!("tests/fixtures/inject/{name}.pod.json")));
        let ops = patch_for(&pod, &InjectorConfig::default());
        let whole = ops
            .iter()
            .find(|o| o.path == "/metadata/annotations")
            .unwrap_or_else(|| panic!("{name}: {ops:?}"));
        assert!(
            whole
                .value
                .to_value()
                .get("sidecar.istio.io/status")
                .is_some(),
            "{name}"
        );
    }
    // Not even metadata (a bare template): the whole metadata object.
    let ops = patch_for(
        &json!({"spec": {"containers": [{"name": "app"}]}}),
        &InjectorConfig::default(),
    );
    assert!(ops.iter().any(|o| o.path == "/metadata"), "{ops:?}");
}

#[test]
fn bad_annotations_are_refused_naming_key_and_value() {
    let p = MeshProfile::istio();
    let cfg = InjectorConfig::default();
    for (key, value, why) in [
        (
            "traffic.sidecar.istio.io/excludeInboundPorts",
            "80;reboot",
            "not a port",
        ),
        (
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "10.0.0.0/8 -j DROP",
            "CIDR",
        ),
        ("sidecar.istio.io/proxyCPU", "two", "quantity"),
        ("sidecar.istio.io/proxyMemory", "-1Gi", "negative"),
        ("sidecar.istio.io/logLevel", "debug --foo", "only letters"),
        ("sidecar.istio.io/proxyImage", "evil image", "only letters"),
        ("status.sidecar.istio.io/port", "15020x", "integer"),
        ("sidecar.istio.io/nativeSidecar", "yes", "true or false"),
        ("proxy.istio.io/config", "[1, 2]", "ProxyConfig mapping"),
        ("sidecar.istio.io/userVolume", "{\"v\": 1}", "named object"),
        (
            "inject.istio.io/templates",
            "grpc-simple",
            "`sidecar`, `gateway` and `grpc-agent` templates only",
        ),
        (
            "inject.istio.io/templates",
            "grpc-agent,sidecar",
            "cannot be combined",
        ),
        (
            "inject.istio.io/templates",
            "sidecar,gateway",
            "cannot be combined",
        ),
        ("inject.istio.io/templates", "", "a template name is empty"),
        (
            "prometheus.io/port",
            "15000",
            "reserved for Istio (Envoy admin)",
        ),
        (
            "prometheus.istio.io/scrape-targets",
            "15020:/metrics",
            "the agent's own",
        ),
        ("prometheus.io/port", "http", "1-65535"),
        (
            "prometheus.istio.io/scrape-targets",
            "8080:/m,15090:/x",
            "reserved for Istio (Envoy Prometheus",
        ),
        (
            "prometheus.istio.io/scrape-targets",
            ":/metrics",
            "empty port",
        ),
    ] {
        let pod = json!({"metadata": {"name": "x", "annotations": {key: value}},
                         "spec": {"containers": [{"name": "app"}]}});
        let plan = plan(&pod, Some("shop"), None, &cfg, &p).expect("readable");
        assert!(plan.decision.inject);
        match plan.patch {
            Err(e @ Error::InvalidAnnotation { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(key) && msg.contains(&format!("{value:?}")) && msg.contains(why),
                    "{msg}"
                );
            }
            other => panic!("{key}={value:?}: {other:?}"),
        }
    }
    // Not injected: nothing to refuse (the plugin will never read it).
    let pod = json!({"metadata": {"name": "x", "annotations": {
        "sidecar.istio.io/inject": "false",
        "traffic.sidecar.istio.io/excludeInboundPorts": "nope"}},
        "spec": {"containers": [{"name": "app"}]}});
    assert_eq!(
        plan(&pod, None, None, &cfg, &p).expect("readable").patch,
        Ok(vec![])
    );
}

#[test]
fn resource_annotations_replace_the_values_and_are_checked_together() {
    // As Istio's template: any proxyCPU/Memory annotation replaces the configured resources.
    let p = MeshProfile::istio();
    let cfg = InjectorConfig::default();
    let pod = json!({"metadata": {"name": "x", "annotations": {
        "sidecar.istio.io/proxyMemory": "4Gi", "sidecar.istio.io/proxyMemoryLimit": "1Gi"}},
        "spec": {"containers": [{"name": "app"}]}});
    match plan(&pod, None, None, &cfg, &p).expect("readable").patch {
        Err(e) => assert!(e.to_string().contains("limit 1Gi"), "{e}"),
        Ok(ops) => panic!("accepted: {ops:?}"),
    }
    let pod = json!({"metadata": {"name": "x", "annotations": {"sidecar.istio.io/proxyCPU": "50m"}},
        "spec": {"containers": [{"name": "app"}]}});
    let mut patched = pod.clone();
    let ops = plan(&pod, None, None, &cfg, &p)
        .expect("readable")
        .patch
        .expect("ok");
    apply_patch(&mut patched, &ops).expect("applies");
    assert_eq!(
        patched["spec"]["initContainers"][0]["resources"],
        json!({"requests": {"cpu": "50m"}})
    );
}

#[test]
fn refused_template_annotations_are_named_in_warnings() {
    let p = MeshProfile::istio();
    let pod = json!({"metadata": {"name": "x", "annotations": {
        "sidecar.istio.io/enableCoreDump": "true", "sidecar.istio.io/capNetBindService": "true"}},
        "spec": {"containers": [{"name": "app"}]}});
    let plan = plan(&pod, None, None, &InjectorConfig::default(), &p).expect("readable");
    assert!(plan.patch.is_ok());
    let w = plan.decision.warnings.join("\n");
    assert!(
        w.contains("sidecar.istio.io/enableCoreDump is ignored"),
        "{w}"
    );
    assert!(
        w.contains("sidecar.istio.io/capNetBindService is ignored"),
        "{w}"
    );
}

#[test]
fn surprising_pods_get_warnings() {
    let p = MeshProfile::istio();
    let pod = json!({"metadata": {"name": "x", "annotations": {"sidecar.istio.io/interceptionMode": "TPROXY"}},
                     "spec": {"containers": [{"name": "app", "securityContext": {"runAsUser": 1337}}]}});
    let planned = plan(&pod, None, None, &InjectorConfig::default(), &p).expect("readable");
    assert!(planned.patch.is_ok());
    let w = planned.decision.warnings.join("\n");
    assert!(w.contains("only programs REDIRECT"), "{w}");
    assert!(w.contains("from the pod's annotation"), "{w}");
    assert!(w.contains("container app runs as uid 1337"), "{w}");
    // The uid or group each container runs as, its own or the pod's (kubelet's rule), against
    // the proxy's as merged (the pod's own istio-proxy may change it); a sidecar the pod
    // starts counts, a plain init container does not (Istio's way to reach the network
    // before the proxy starts is to run it as the proxy's uid).
    for (pod, want, not) in [
        (
            json!({"metadata": {"name": "x"}, "spec": {"securityContext": {"runAsUser": 1337},
                   "containers": [{"name": "app"}]}}),
            vec!["container app runs as uid 1337"],
            vec![],
        ),
        (
            json!({"metadata": {"name": "x"}, "spec": {"securityContext": {"runAsUser": 1337},
                   "containers": [{"name": "app", "securityContext": {"runAsUser": 1000}}]}}),
            vec![],
            vec!["container app runs as"],
        ),
        (
            json!({"metadata": {"name": "x"}, "spec": {"containers": [
                {"name": "app", "securityContext": {"runAsUser": 1000, "runAsGroup": 1337}}]}}),
            vec!["container app runs as gid 1337, the proxy's group"],
            vec![],
        ),
        (
            json!({"metadata": {"name": "x"}, "spec": {"securityContext": {"runAsUser": 1000},
                   "containers": [{"name": "app"},
                                  {"name": "istio-proxy", "securityContext": {"runAsUser": 1000}}]}}),
            vec!["container app runs as uid 1000, the proxy's"],
            vec![],
        ),
        (
            json!({"metadata": {"name": "x"}, "spec": {
                   "initContainers": [
                       {"name": "setup", "securityContext": {"runAsUser": 1337}},
                       {"name": "logs", "restartPolicy": "Always", "securityContext": {"runAsUser": 1337}}],
                   "containers": [{"name": "app"}]}}),
            vec!["container logs runs as uid 1337"],
            vec!["container setup"],
        ),
    ] {
        let planned = plan(&pod, None, None, &InjectorConfig::default(), &p).expect("readable");
        assert!(planned.patch.is_ok(), "{pod}: {:?}", planned.patch);
        let w = planned.decision.warnings.join("\n");
        for s in want {
            assert!(w.contains(s), "{pod}: want {s:?} in {w}");
        }
        for s in not {
            assert!(!w.contains(s), "{pod}: {s:?} in {w}");
        }
    }
    // The mode as rendered, wherever it came from: the pod's ProxyConfig, the mesh's.
    let pod = json!({"metadata": {"name": "x", "annotations": {"proxy.istio.io/config": "interceptionMode: TPROXY"}},
                     "spec": {"containers": [{"name": "app"}]}});
    let planned = plan(&pod, None, None, &InjectorConfig::default(), &p).expect("readable");
    let w = planned.decision.warnings.join("\n");
    assert!(w.contains("\"TPROXY\" (from ProxyConfig"), "{w}");
    let mut cfg = InjectorConfig {
        mesh: json!({"defaultConfig": {"interceptionMode": "NONE"}}),
        ..Default::default()
    };
    cfg = cfg.prepared().expect("config");
    let pod = json!({"metadata": {"name": "x"}, "spec": {"containers": [{"name": "app"}]}});
    let planned = plan(&pod, None, None, &cfg, &p).expect("readable");
    let w = planned.decision.warnings.join("\n");
    assert!(w.contains("\"NONE\" (from ProxyConfig"), "{w}");
    // REDIRECT, the default, is not worth a word.
    let planned = plan(&pod, None, None, &InjectorConfig::default(), &p).expect("readable");
    assert!(
        !planned.decision.warnings.join("\n").contains("REDIRECT"),
        "{:?}",
        planned.decision.warnings
    );
}

#[test]
fn unreadable_objects_are_errors_not_panics() {
    let p = MeshProfile::istio();
    let cfg = InjectorConfig::default();
    for v in [
        json!(null),
        json!("pod"),
        json!([1]),
        json!({"metadata": {"labels": {"version": 1}}}),
        json!({"spec": {"containers": "app"}}),
        json!({"spec": {"hostNetwork": "yes"}}),
    ] {
        match plan(&v, None, None, &cfg, &p) {
            Err(Error::InvalidPod { reason }) => assert!(!reason.is_empty()),
            other => panic!("{v}: {other:?}"),
        }
    }
}

#[test]
fn null_members_of_the_pods_own_proxy_read_as_absent() {
    // As a hand-written manifest has it (`securityContext:` with nothing after it), and as
    // Istio's typed decode reads it: absent, so the template's values stay. The pod runs as
    // 1000: had the null wiped the proxy's own uid, the proxy would run as 1000 while
    // podwire-cni exempts 1337, looping its traffic back to itself.
    for own in [
        json!({"name": "istio-proxy", "image": "auto", "securityContext": null, "restartPolicy": null}),
        json!({"name": "istio-proxy", "image": "auto",
               "securityContext": {"runAsUser": null, "runAsGroup": null}}),
    ] {
        let pod = json!({
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": {
                "securityContext": {"runAsUser": 1000, "runAsGroup": 1000},
                "containers": [{"name": "app", "image": "app"}, own]
            }
        });
        let mut patched = pod.clone();
        apply_patch(&mut patched, &patch_for(&pod, &InjectorConfig::default())).expect("applies");
        let proxy = patched["spec"]["initContainers"]
            .as_array()
            .and_then(|l| l.iter().find(|c| c["name"] == "istio-proxy"))
            .expect("the proxy, a native sidecar");
        assert_eq!(proxy["restartPolicy"], json!("Always"), "{proxy}");
        assert_eq!(
            proxy["securityContext"]["runAsUser"],
            json!(1337),
            "{proxy}"
        );
        assert_eq!(
            proxy["securityContext"]["runAsGroup"],
            json!(1337),
            "{proxy}"
        );
        // What the plugin will exempt is what the proxy runs as.
        let info = read_pod(&patched).expect("readable");
        let spec = RedirectSpec::from_pod(&info, &MeshProfile::istio()).expect("redirected");
        assert_eq!((spec.proxy_uid, spec.proxy_gid), (1337, 1337));
        // Istio's record of the pod's own container holds no null either.
        let overrides = patched["metadata"]["annotations"]["proxy.istio.io/overrides"]
            .as_str()
            .expect("overrides annotation");
        assert!(!overrides.contains("null"), "{overrides}");
    }
}

#[test]
fn dns_capture_is_said_to_be_off() {
    let p = MeshProfile::istio();
    let with = |pc: &str| {
        let pod = json!({"metadata": {"name": "x", "annotations": {"proxy.istio.io/config": pc}},
                         "spec": {"containers": [{"name": "app"}]}});
        let planned = plan(&pod, None, None, &InjectorConfig::default(), &p).expect("readable");
        assert!(planned.patch.is_ok(), "{:?}", planned.patch);
        planned.decision.warnings.join("\n")
    };
    let w = with("proxyMetadata: {ISTIO_META_DNS_CAPTURE: \"true\"}");
    assert!(w.contains("does not redirect DNS"), "{w}");
    let w = with("proxyMetadata: {ISTIO_META_DNS_CAPTURE: \"false\"}");
    assert!(!w.contains("DNS"), "{w}");
}

#[test]
fn a_native_proxy_the_pod_makes_a_plain_init_container_is_refused() {
    let pod = json!({
        "metadata": {"name": "p", "namespace": "shop"},
        "spec": {"containers": [
            {"name": "app", "image": "app"},
            {"name": "istio-proxy", "image": "auto", "restartPolicy": "OnFailure"}
        ]}
    });
    let planned = plan(
        &pod,
        None,
        None,
        &InjectorConfig::default(),
        &MeshProfile::istio(),
    )
    .expect("readable");
    let msg = planned.patch.expect_err("refused").to_string();
    assert!(
        msg.contains("restartPolicy \"OnFailure\"") && msg.contains("needs restartPolicy Always"),
        "{msg}"
    );
}

#[test]
fn the_pods_volumes_keep_the_first_of_each_name() {
    let pod = json!({
        "metadata": {"name": "p", "namespace": "shop"},
        "spec": {
            "containers": [{"name": "app", "image": "app"}],
            "volumes": [
                {"name": "data", "emptyDir": {}},
                {"name": "data", "configMap": {"name": "c"}},
                {"emptyDir": {}},
                {"hostPath": {"path": "/x"}},
                {"name": "istio-envoy", "emptyDir": {}}
            ]
        }
    });
    let mut patched = pod.clone();
    apply_patch(&mut patched, &patch_for(&pod, &InjectorConfig::default())).expect("applies");
    let volumes = patched["spec"]["volumes"].as_array().expect("volumes");
    let own: Vec<&Value> = volumes.iter().skip_while(|v| v["name"] != "data").collect();
    assert_eq!(
        own,
        [
            &json!({"name": "data", "emptyDir": {}}),
            &json!({"emptyDir": {}})
        ],
        "{volumes:?}"
    );
    // The template's istio-envoy replaces the pod's own of that name.
    let envoy: Vec<&Value> = volumes
        .iter()
        .filter(|v| v["name"] == "istio-envoy")
        .collect();
    assert_eq!(
        envoy,
        [&json!({"name": "istio-envoy", "emptyDir": {"medium": "Memory"}})]
    );
}

/// The pod once patched, and the decision's warnings.
fn injected(pod: &Value, cfg: &InjectorConfig) -> (Value, Vec<String>) {
    let p = plan(pod, Some("shop"), None, cfg, &MeshProfile::istio()).expect("readable");
    assert!(p.decision.inject, "{}", p.decision.reason);
    let mut out = pod.clone();
    apply_patch(&mut out, &p.patch.expect("accepted")).expect("applies");
    (out, p.decision.warnings)
}

fn env_of<'a>(c: &'a Value, name: &str) -> Option<&'a Value> {
    c["env"].as_array()?.iter().find(|e| e["name"] == name)
}

#[test]
fn a_gateway_is_istios_gateway_template() {
    // As Istio's gateway chart writes it: its own istio-proxy, with ports, beside an app.
    let pod = json!({"metadata": {"name": "gw", "annotations": {
            "inject.istio.io/templates": "gateway",
            "sidecar.istio.io/proxyCPU": "2",
            "sidecar.istio.io/userVolume": "{\"v\": {\"emptyDir\": {}}}"}},
        "spec": {"containers": [
            {"name": "app", "ports": [{"containerPort": 8080}]},
            {"name": "istio-proxy", "image": "auto", "ports": [{"containerPort": 15090, "protocol": "TCP", "name": "http-envoy-prom"}]}]}});
    let cfg = InjectorConfig {
        values: json!({"global": {"proxy": {"holdApplicationUntilProxyStarts": true}}}),
        ..InjectorConfig::default()
    };
    let (out, warnings) = injected(&pod, &cfg);
    let containers = out["spec"]["containers"].as_array().expect("containers");
    // Istio's webhook moves the proxy first when the app is held, whatever the template.
    assert_eq!(containers[0]["name"], "istio-proxy", "{out}");
    let proxy = &containers[0];
    assert_eq!(proxy["args"][1], "router");
    // No resources from the template (the pod's own container's `{}`, as Istio writes it).
    assert_eq!(proxy["resources"], json!({}), "{proxy}");
    assert!(proxy.get("lifecycle").is_none(), "no hold hook: {proxy}");
    assert_eq!(
        proxy["securityContext"],
        json!({"runAsUser": 1337, "runAsGroup": 1337})
    );
    // The pod's own proxy's ports count, as Istio's template loops over every container.
    let ports = env_of(proxy, "ISTIO_META_POD_PORTS").expect("ports")["value"]
        .as_str()
        .expect("text");
    assert!(ports.contains("8080") && ports.contains("15090"), "{ports}");
    assert!(out["metadata"]["labels"]
        .get("security.istio.io/tlsMode")
        .is_none());
    let a = &out["metadata"]["annotations"];
    assert!(a.get("sidecar.istio.io/interceptionMode").is_none(), "{a}");
    assert!(out["spec"]["initContainers"].is_null());
    assert!(
        !out["spec"]["volumes"].to_string().contains("\"v\""),
        "no user volume"
    );
    assert_eq!(
        out["spec"]["securityContext"]["sysctls"][0]["name"],
        "net.ipv4.ip_unprivileged_port_start"
    );
    let w = warnings.join("\n");
    assert!(w.contains("sidecar.istio.io/proxyCPU is ignored"), "{w}");
    assert!(w.contains("sidecar.istio.io/userVolume is ignored"), "{w}");
    assert!(!w.contains("podwire-cni will not redirect"), "{w}");
}

#[test]
fn a_proxyless_grpc_pod_gets_istios_grpc_agent_template() {
    // Istio's grpc-agent fixture covers the plain pod; this one has what the fixture has not:
    // the app's own bootstrap path and mount, an HTTP probe, a held app, a customised proxy.
    let pod = json!({"metadata": {"name": "g", "labels": {"app": "g"}, "annotations": {
            "inject.istio.io/templates": "grpc-agent",
            "sidecar.istio.io/interceptionMode": "TPROXY",
            "traffic.sidecar.istio.io/excludeInboundPorts": "9000",
            "proxy.istio.io/config": "holdApplicationUntilProxyStarts: true"}},
        "spec": {"containers": [
            {"name": "app", "ports": [{"containerPort": 50051}],
             "env": [{"name": "BOOT", "value": "$(GRPC_XDS_BOOTSTRAP)"},
                     {"name": "GRPC_XDS_BOOTSTRAP", "value": "/mine.json"}],
             "volumeMounts": [{"name": "mine", "mountPath": "/etc/istio/proxy"},
                              {"name": "tmp", "mountPath": "/tmp"}],
             "readinessProbe": {"httpGet": {"port": 8080, "path": "/ready"}}},
            {"name": "istio-proxy", "image": "auto", "args": ["proxy", "sidecar", "--concurrency=1"]}]}});
    let (out, warnings) = injected(&pod, &InjectorConfig::default());
    let containers = out["spec"]["containers"].as_array().expect("containers");
    // Never a native sidecar; first, as the app is held.
    assert!(out["spec"]["initContainers"].is_null(), "{out}");
    assert_eq!(containers[0]["name"], "istio-proxy", "{out}");
    let (proxy, app) = (&containers[0], &containers[1]);
    for (c, name, value) in [
        (proxy, "DISABLE_ENVOY", "true"),
        (proxy, "ISTIO_META_GENERATOR", "grpc"),
        // The app's own settings win; what it lacks is added.
        (app, "GRPC_XDS_BOOTSTRAP", "/mine.json"),
        (app, "GRPC_XDS_EXPERIMENTAL_SECURITY_SUPPORT", "true"),
    ] {
        assert_eq!(env_of(c, name).expect(name)["value"], value, "{c}");
    }
    assert!(env_of(proxy, "ISTIO_META_INTERCEPTION_MODE").is_none());
    // The pod's own proxy customises the template's.
    assert_eq!(proxy["args"][2], "--concurrency=1", "{proxy}");
    assert!(
        proxy.get("securityContext").is_none(),
        "as Istio's: {proxy}"
    );
    assert_eq!(proxy["readinessProbe"]["httpGet"]["port"], 15020);
    let mounts: Vec<(&str, &str)> = app["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or(""),
                m["mountPath"].as_str().unwrap_or(""),
            )
        })
        .collect();
    // The template's entries first, in its order (the app's own where both name one), then
    // the app's others: as Istio's strategic merge leaves them, so `$(GRPC_XDS_BOOTSTRAP)`
    // in the app's later env var sees the variable.
    assert_eq!(
        mounts,
        [
            ("istio-data", "/var/lib/istio/data"),
            ("mine", "/etc/istio/proxy"),
            (
                "workload-certs",
                "/var/run/secrets/workload-spiffe-credentials"
            ),
            ("tmp", "/tmp"),
        ]
    );
    let env: Vec<&str> = app["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert_eq!(
        env,
        [
            "GRPC_XDS_EXPERIMENTAL_SECURITY_SUPPORT",
            "GRPC_XDS_BOOTSTRAP",
            "BOOT"
        ]
    );
    // gRPC apps' probes are left as written.
    assert_eq!(app["readinessProbe"]["httpGet"]["port"], 8080);
    assert!(out["metadata"]["labels"]
        .get("security.istio.io/tlsMode")
        .is_none());
    let a = &out["metadata"]["annotations"];
    assert_eq!(a["sidecar.istio.io/rewriteAppHTTPProbers"], "false");
    assert_eq!(
        a["sidecar.istio.io/interceptionMode"], "TPROXY",
        "the pod's own, untouched"
    );
    let status: Value =
        serde_json::from_str(a["sidecar.istio.io/status"].as_str().expect("status")).expect("JSON");
    assert_eq!(status["containers"], json!(["istio-proxy", "app"]));
    let overrides: Value =
        serde_json::from_str(a["proxy.istio.io/overrides"].as_str().expect("overrides"))
            .expect("JSON");
    let names: Vec<&str> = overrides["containers"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["istio-proxy", "app"]);
    // podwire-cni leaves it alone, by design: not a warning.
    let info: podwire_core::PodInfo = serde_json::from_value(out.clone()).expect("pod info");
    assert!(!podwire_core::mesh_decision(&info, &MeshProfile::istio(), &[]).is_redirect());
    let w = warnings.join("\n");
    assert!(!w.contains("will not redirect"), "{w}");
    assert!(
        w.contains("sidecar.istio.io/interceptionMode is ignored"),
        "{w}"
    );
    assert!(
        w.contains("traffic.sidecar.istio.io/excludeInboundPorts is ignored"),
        "{w}"
    );
}

#[test]
fn a_grpc_agent_pod_podwire_cni_would_redirect_is_said() {
    // The pod's own istio-proxy switches Envoy back on: podwire-cni now sees a sidecar.
    let pod = json!({"metadata": {"name": "g", "annotations": {
            "inject.istio.io/templates": "grpc-agent",
            "status.sidecar.istio.io/port": "0",
            "sidecar.istio.io/userVolumeMount": "{\"v\": {\"mountPath\": \"/v\"}}"}},
        "spec": {"containers": [{"name": "app"},
            {"name": "istio-proxy", "image": "auto",
             "env": [{"name": "DISABLE_ENVOY", "value": "false"}]}]}});
    let (out, warnings) = injected(&pod, &InjectorConfig::default());
    let info: podwire_core::PodInfo = serde_json::from_value(out.clone()).expect("pod info");
    assert!(podwire_core::mesh_decision(&info, &MeshProfile::istio(), &[]).is_redirect());
    let w = warnings.join("\n");
    assert!(
        w.contains("podwire-cni will redirect this grpc-agent pod"),
        "{w}"
    );
    // With status port 0 the template mounts nothing, the user's mount included: said.
    let proxy = &out["spec"]["containers"][1];
    assert!(proxy.get("volumeMounts").is_none(), "{proxy}");
    assert!(
        w.contains("sidecar.istio.io/userVolumeMount is ignored"),
        "{w}"
    );
}

#[test]
fn unknown_interception_modes_are_refused_as_istio_does() {
    let p = MeshProfile::istio();
    for (key, value) in [
        ("sidecar.istio.io/interceptionMode", "FOO"),
        ("proxy.istio.io/config", "interceptionMode: redirect"),
    ] {
        for template in ["sidecar", "grpc-agent"] {
            let pod = json!({"metadata": {"name": "x", "annotations": {
                    key: value, "inject.istio.io/templates": template}},
                "spec": {"containers": [{"name": "app"}]}});
            let plan =
                plan(&pod, Some("shop"), None, &InjectorConfig::default(), &p).expect("readable");
            let err = plan.patch.expect_err("refused").to_string();
            assert!(
                err.contains(key) && err.contains("expected REDIRECT, TPROXY or NONE"),
                "{template}: {err}"
            );
        }
    }
    // The mesh's own default is a settings error, found when the settings are read.
    let cfg = InjectorConfig {
        mesh: json!({"defaultConfig": {"interceptionMode": "FOO"}}),
        ..InjectorConfig::default()
    };
    let pod = json!({"metadata": {"name": "x"}, "spec": {"containers": [{"name": "app"}]}});
    let err = plan(&pod, Some("shop"), None, &cfg, &p)
        .expect("readable")
        .patch
        .expect_err("refused")
        .to_string();
    assert!(err.contains("mesh.defaultConfig.interceptionMode"), "{err}");
}

#[test]
fn a_sidecar_the_plugin_would_leave_alone_is_said() {
    let cfg = InjectorConfig::default();
    for (pod, why) in [
        (
            json!({"metadata": {"name": "x"}, "spec": {"containers": [{"name": "app"},
                {"name": "istio-proxy", "image": "auto", "args": ["proxy", "router"]}]}}),
            "runs as `proxy router`",
        ),
        (
            json!({"metadata": {"name": "x", "annotations": {
                "proxy.istio.io/config": "proxyMetadata: {DISABLE_ENVOY: \"true\"}"}},
                "spec": {"containers": [{"name": "app"}]}}),
            "DISABLE_ENVOY=true",
        ),
    ] {
        let (_, warnings) = injected(&pod, &cfg);
        let w = warnings.join("\n");
        assert!(
            w.contains("podwire-cni will not redirect this pod") && w.contains(why),
            "{w}"
        );
    }
    // A plain customisation says nothing.
    let pod = json!({"metadata": {"name": "x"}, "spec": {"containers": [{"name": "app"},
        {"name": "istio-proxy", "image": "auto", "env": [{"name": "DISABLE_ENVOY", "value": "false"}]}]}});
    let (_, warnings) = injected(&pod, &cfg);
    assert!(
        !warnings.join("\n").contains("will not redirect"),
        "{warnings:?}"
    );
}

#[test]
fn prometheus_annotations_merge_as_istios_webhook() {
    let cfg = InjectorConfig::default();
    // Another spelling of scrape: false turns the merge off.
    let pod = json!({"metadata": {"name": "x", "annotations": {"prometheus.io.scrape": "false"}},
        "spec": {"containers": [{"name": "app"}]}});
    let (out, _) = injected(&pod, &cfg);
    assert!(out["metadata"]["annotations"]
        .get("prometheus.io/port")
        .is_none());
    // Empty values are unset: no scrape config for the agent, podwire's three annotations.
    let pod = json!({"metadata": {"name": "x", "annotations": {"prometheus.io/path": ""}},
        "spec": {"containers": [{"name": "app"}]}});
    let (out, _) = injected(&pod, &cfg);
    let proxy = &out["spec"]["initContainers"][0];
    assert!(
        env_of(proxy, "ISTIO_PROMETHEUS_ANNOTATIONS").is_none(),
        "{proxy}"
    );
    assert_eq!(
        out["metadata"]["annotations"]["prometheus.io/path"],
        "/stats/prometheus"
    );
    // Every spelling is replaced by podwire's; the agent gets the app's, targets first.
    let pod = json!({"metadata": {"name": "x", "annotations": {
            "prometheus-io/port": "9000",
            "prometheus.istio.io/scrape-targets": " 8080 , 9100:/custom "}},
        "spec": {"containers": [{"name": "app"}]}});
    let (out, _) = injected(&pod, &cfg);
    let a = out["metadata"]["annotations"]
        .as_object()
        .expect("annotations");
    assert!(
        !a.contains_key("prometheus-io/port")
            && !a.contains_key("prometheus.istio.io/scrape-targets"),
        "{a:?}"
    );
    let proxy = &out["spec"]["initContainers"][0];
    let text = env_of(proxy, "ISTIO_PROMETHEUS_ANNOTATIONS").expect("env")["value"]
        .as_str()
        .expect("text");
    assert_eq!(
        text,
        r#"{"scrape":"","path":"/metrics","port":"8080","targets":[{"port":"8080","path":"/metrics"},{"port":"9100","path":"/custom"}]}"#
    );
}

#[test]
fn the_secure_metrics_port_is_announced_as_istio_does() {
    let cfg = InjectorConfig {
        mesh: json!({"defaultConfig": {"proxyMetadata": {"ENVOY_SECURE_MERGED_METRICS_PORT": "15091"}}}),
        ..InjectorConfig::default()
    };
    let pod = json!({"metadata": {"name": "x"}, "spec": {"containers": [{"name": "app"}]}});
    let (out, _) = injected(&pod, &cfg);
    assert_eq!(
        out["metadata"]["annotations"]["prometheus.istio.io/secure-port"],
        "15091"
    );
    // The pod's own announcement stays.
    let pod = json!({"metadata": {"name": "x", "annotations": {"prometheus.istio.io/secure-port": "9443"}},
        "spec": {"containers": [{"name": "app"}]}});
    let (out, _) = injected(&pod, &cfg);
    assert_eq!(
        out["metadata"]["annotations"]["prometheus.istio.io/secure-port"],
        "9443"
    );
    // None without the variable.
    let (out, _) = injected(&pod, &InjectorConfig::default());
    let pod = json!({"metadata": {"name": "x"}, "spec": {"containers": [{"name": "app"}]}});
    let (plain, _) = injected(&pod, &InjectorConfig::default());
    assert!(plain["metadata"]["annotations"]
        .get("prometheus.istio.io/secure-port")
        .is_none());
    assert_eq!(
        out["metadata"]["annotations"]["prometheus.istio.io/secure-port"],
        "9443"
    );
}
