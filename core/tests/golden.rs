//! Golden files for the rendered rules: one case per traffic annotation, IPv4 and IPv6.
//! `UPDATE_GOLDEN=1 cargo test -p podwire-core --test golden` rewrites them; review the diff.

use podwire_core::render::render;
use podwire_core::{Family, MeshProfile, PodInfo, RedirectSpec};
use std::path::{Path, PathBuf};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn pod(annotations: &[(&str, &str)], security: Option<(i64, i64)>) -> PodInfo {
    let mut v = serde_json::json!({
        "metadata": {"name": "p", "namespace": "shop", "annotations": {"sidecar.istio.io/status": "{}"}},
        "spec": {"containers": [{"name": "app"}, {"name": "istio-proxy"}]}
    });
    for (k, val) in annotations {
        v["metadata"]["annotations"][*k] = serde_json::Value::String(val.to_string());
    }
    if let Some((u, g)) = security {
        v["spec"]["containers"][1]["securityContext"] =
            serde_json::json!({"runAsUser": u, "runAsGroup": g});
    }
    serde_json::from_value(v).expect("pod")
}

const T: &str = "traffic.sidecar.istio.io/";

fn cases() -> Vec<(&'static str, PodInfo)> {
    let k = |s: &str| format!("{T}{s}");
    let one = |key: &str, val: &str| pod(&[(k(key).as_str(), val)], None);
    vec![
        ("default", pod(&[], None)),
        (
            "include-inbound-ports",
            one("includeInboundPorts", "8080,9090"),
        ),
        ("include-inbound-none", one("includeInboundPorts", "")),
        (
            "exclude-inbound-ports",
            one("excludeInboundPorts", "9000,15021"),
        ),
        (
            "include-outbound-ports",
            one("includeOutboundPorts", "3306"),
        ),
        (
            "exclude-outbound-ports",
            one("excludeOutboundPorts", "5432,6379"),
        ),
        (
            "include-outbound-ranges",
            one("includeOutboundIPRanges", "10.0.0.0/8,fd00::/8"),
        ),
        ("include-outbound-none", one("includeOutboundIPRanges", "")),
        (
            "include-outbound-loopback",
            one("includeOutboundIPRanges", "127.0.0.0/8"),
        ),
        (
            "exclude-outbound-ranges",
            one("excludeOutboundIPRanges", "169.254.169.254/32,fd00::/8"),
        ),
        ("exclude-interfaces", one("excludeInterfaces", "eth1,net+")),
        ("proxy-uid-gid", pod(&[], Some((2000, 3000)))),
    ]
}

#[test]
fn default_ipv4_equals_the_istio_reference_rule_for_rule() {
    let p = MeshProfile::istio();
    let reference =
        std::fs::read_to_string(golden_dir().join("reference-istio-sidecar-cni-default.rules"))
            .expect("reference file");
    let rendered = render(&RedirectSpec::defaults(&p), &p, Family::V4).to_restore_input();
    assert_eq!(rendered, reference);
    // The repo's copy must stay the shared contract's file, when the shared tree is beside us.
    let shared = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/compat/istio-sidecar-cni-default.rules");
    if let Ok(contract) = std::fs::read_to_string(&shared) {
        assert_eq!(
            reference, contract,
            "core/tests/golden reference drifted from shared/compat"
        );
    }
}

#[test]
fn golden_files() {
    let p = MeshProfile::istio();
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    for (name, pod) in cases() {
        let spec = RedirectSpec::from_pod(&pod, &p).expect("case annotations are valid");
        for (fam, ext) in [(Family::V4, "v4"), (Family::V6, "v6")] {
            let got = render(&spec, &p, fam).to_restore_input();
            let path = golden_dir().join(format!("{name}.{ext}.rules"));
            if update {
                std::fs::write(&path, &got).expect("write golden");
            } else {
                match std::fs::read_to_string(&path) {
                    Ok(want) if want == got => {}
                    Ok(want) => failures.push(format!(
                        "{}:\n--- want\n{want}--- got\n{got}",
                        path.display()
                    )),
                    Err(e) => failures.push(format!(
                        "{}: {e} (run with UPDATE_GOLDEN=1)",
                        path.display()
                    )),
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
