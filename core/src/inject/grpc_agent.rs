//! Istio's `grpc-agent` injection template (`inject.istio.io/templates: grpc-agent`): proxyless
//! gRPC. The `istio-proxy` container runs pilot-agent without Envoy (`DISABLE_ENVOY=true`) and
//! serves the app's gRPC library its xDS bootstrap and certificates over a shared volume; the
//! app talks to istiod's xDS itself, so nothing is redirected and podwire-cni leaves the pod
//! alone. What differs from the sidecar template is here; [`super::istio::render`] does the
//! rest (image, resources, Istio's post-processing) as for every template.
//!
//! As in Istio's template, the proxy has no securityContext: a grpc-agent pod is not Pod
//! Security "restricted" by itself.

use super::istio::{env, Resolved};
use serde_json::{json, Value};

/// The agent's status and metrics port: the template probes and announces 15020.
pub const STATUS_PORT: i64 = 15020;

/// The xDS bootstrap the app's gRPC library reads, on the `istio-xds` volume.
const BOOTSTRAP: &str = "/etc/istio/proxy/grpc-bootstrap.json";

/// The template's first env vars (before the sidecar's common ones).
pub fn env_first() -> [Value; 2] {
    [
        env("ISTIO_META_GENERATOR", "grpc"),
        env("OUTPUT_CERTS", "/var/lib/istio/data"),
    ]
}

/// The template's last env vars: no DNS capture (gRPC resolves `xds:///` itself), no Envoy.
pub fn env_last() -> [Value; 2] {
    [
        env("ISTIO_META_DNS_CAPTURE", "false"),
        env("DISABLE_ENVOY", "true"),
    ]
}

pub fn ports() -> Value {
    json!([{"containerPort": STATUS_PORT, "protocol": "TCP", "name": "mesh-metrics"}])
}

/// The app starts once the agent has written the bootstrap.
pub fn lifecycle() -> Value {
    json!({"postStart": {"exec": {"command": [
        "pilot-agent", "wait", format!("--url=http://localhost:{STATUS_PORT}/healthz/ready")
    ]}}})
}

/// The readiness probe, on the agent's port; `timing`: the pod's readiness annotations.
pub fn readiness_probe(s: &Resolved, timing: [Option<i64>; 3]) -> Value {
    let [delay, period, failure] = timing;
    let mut p = json!({
        "httpGet": {"path": "/healthz/ready", "port": STATUS_PORT},
        "initialDelaySeconds": delay.unwrap_or(s.readiness_initial_delay),
        "periodSeconds": period.unwrap_or(s.readiness_period),
        "timeoutSeconds": 3,
        "failureThreshold": failure.unwrap_or(s.readiness_failure_threshold),
    });
    // Go leaves zero out.
    if let Value::Object(m) = &mut p {
        m.retain(|_, x| x.as_i64() != Some(0));
    }
    p
}

fn workload_certs_mount(s: &Resolved) -> Value {
    if s.ca_name == "GkeWorkloadCertificate" {
        json!({"name": "gke-workload-certificate", "mountPath": "/var/run/secrets/workload-spiffe-credentials", "readOnly": true})
    } else {
        json!({"name": "workload-certs", "mountPath": "/var/run/secrets/workload-spiffe-credentials"})
    }
}

/// The proxy's mounts, in the template's order (the pod's `userVolumeMount` ones follow).
pub fn mounts(s: &Resolved) -> Vec<Value> {
    let mut m = vec![
        json!({"name": "workload-socket", "mountPath": "/var/run/secrets/workload-spiffe-uds"}),
        workload_certs_mount(s),
    ];
    if s.pilot_cert_provider == "istiod" {
        m.push(json!({"mountPath": "/var/run/secrets/istio", "name": "istiod-ca-cert"}));
    }
    m.push(json!({"mountPath": "/var/lib/istio/data", "name": "istio-data"}));
    m.push(json!({"mountPath": "/etc/istio/proxy", "name": "istio-xds"}));
    m.push(json!({"mountPath": "/var/run/secrets/tokens", "name": "istio-token"}));
    if s.mount_mtls_certs {
        m.push(json!({"mountPath": "/etc/certs/", "name": "istio-certs", "readOnly": true}));
    }
    m.push(json!({"name": "istio-podinfo", "mountPath": "/etc/istio/pod"}));
    m
}

/// The template's volumes, in its order (the pod's `userVolume` ones follow);
/// `bootstrap`: the pod's `sidecar.istio.io/bootstrapOverride` ConfigMap; `sa`: its service
/// account.
pub fn volumes(s: &Resolved, bootstrap: Option<&str>, sa: &str) -> Vec<Value> {
    let mut v = vec![json!({"name": "workload-socket", "emptyDir": {}})];
    if s.ca_name == "GkeWorkloadCertificate" {
        v.push(json!({"name": "gke-workload-certificate", "csi": {"driver": "workloadcertificates.security.cloud.google.com"}}));
    } else {
        v.push(json!({"name": "workload-certs", "emptyDir": {}}));
    }
    if let Some(b) = bootstrap {
        v.push(json!({"name": "custom-bootstrap-volume", "configMap": {"name": b}}));
    }
    v.push(json!({"name": "istio-xds", "emptyDir": {"medium": "Memory"}}));
    v.push(json!({"name": "istio-data", "emptyDir": {}}));
    v.push(json!({"name": "istio-podinfo", "downwardAPI": {"items": [
        {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
        {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}},
    ]}}));
    v.push(json!({"name": "istio-token", "projected": {"sources": [
        {"serviceAccountToken": {"path": "istio-token", "expirationSeconds": 43200, "audience": s.sds_audience}}
    ]}}));
    if s.pilot_cert_provider == "istiod" {
        let bundle = Some(s.trust_bundle_name.as_str()).filter(|b| !b.is_empty());
        v.push(if s.cluster_trust_bundle {
            json!({"name": "istiod-ca-cert", "projected": {"sources": [{"clusterTrustBundle": {
                "name": format!("istio.io:istiod-ca:{}", bundle.unwrap_or("root-cert")),
                "path": "root-cert.pem"}}]}})
        } else {
            json!({"name": "istiod-ca-cert", "configMap": {"name": bundle.unwrap_or("istio-ca-root-cert")}})
        });
    }
    if s.mount_mtls_certs {
        v.push(json!({"name": "istio-certs", "secret": {"optional": true, "secretName": format!("istio.{sa}")}}));
    }
    v
}

/// An app container as the template leaves it: the bootstrap's env and the shared mounts, in
/// the template's order, then what only the container has. Istio merges the template's
/// container into the pod's (a strategic merge: the patch's entries first), then the pod's own
/// back over it, so an entry both name (env by name, mounts by path) keeps the app's value
/// where the template put it. (podwire keeps the app's entry whole: Istio's field-by-field merge
/// could leave an env var with both `value` and `valueFrom`, which the API server refuses.)
/// Order matters: `$(VAR)` in an env value only sees the variables before it.
pub fn app_container(c: &mut Value, s: &Resolved) {
    let Value::Object(m) = c else {
        return;
    };
    let env = [
        env("GRPC_XDS_EXPERIMENTAL_SECURITY_SUPPORT", "true"),
        env("GRPC_XDS_BOOTSTRAP", BOOTSTRAP),
    ];
    let mounts = [
        json!({"mountPath": "/var/lib/istio/data", "name": "istio-data"}),
        json!({"mountPath": "/etc/istio/proxy", "name": "istio-xds"}),
        workload_certs_mount(s),
    ];
    for (list, template, key) in [
        ("env", &env[..], "name"),
        ("volumeMounts", &mounts[..], "mountPath"),
    ] {
        // null, or anything but a list, reads as no list (as Go reads null).
        let own = match m.remove(list) {
            Some(Value::Array(items)) => items,
            _ => Vec::new(),
        };
        // The app's entry standing in for each of the template's, if any (the first of a name).
        let taken: Vec<Option<usize>> = template
            .iter()
            .map(|t| own.iter().position(|o| o.get(key) == t.get(key)))
            .collect();
        let mut merged: Vec<Value> = template
            .iter()
            .zip(&taken)
            .map(|(t, i)| i.map_or(t, |i| &own[i]).clone())
            .collect();
        merged.extend(
            own.iter()
                .enumerate()
                .filter(|(i, _)| !taken.contains(&Some(*i)))
                .map(|(_, o)| o.clone()),
        );
        m.insert(list.to_string(), Value::Array(merged));
    }
}
