//! Istio's `grpc-agent` injection template (`inject.istio.io/templates: grpc-agent`): proxyless
//! gRPC. The `istio-proxy` container runs pilot-agent without Envoy (`DISABLE_ENVOY=true`) and
//! serves the app's gRPC library its xDS bootstrap and certificates over a shared volume; the
//! app talks to istiod's xDS itself, so nothing is redirected and podwire-cni leaves the pod
//! alone. What differs from the sidecar template is here; [`super::istio::render`] does the
//! rest (image, resources, the volumes and mounts both templates share, Istio's
//! post-processing) as for every template.
//!
//! As in Istio's template, the proxy has no securityContext: a grpc-agent pod is not Pod
//! Security "restricted" by itself.

use super::istio::env;
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

/// The xDS channel between the agent and the app's gRPC library: mounted where the sidecar
/// mounts `istio-envoy`, a memory volume.
pub fn xds_mount() -> Value {
    json!({"mountPath": "/etc/istio/proxy", "name": "istio-xds"})
}

pub fn xds_volume() -> Value {
    json!({"name": "istio-xds", "emptyDir": {"medium": "Memory"}})
}

/// An app container as the template leaves it: the bootstrap's env and the shared mounts, in
/// the template's order, then what only the container has. Istio merges the template's
/// container into the pod's (a strategic merge: the patch's entries first), then the pod's own
/// back over it, so an entry both name (env by name, mounts by path) keeps the app's value
/// where the template put it. (podwire keeps the app's entry whole: Istio's field-by-field merge
/// could leave an env var with both `value` and `valueFrom`, which the API server refuses.)
/// Order matters: `$(VAR)` in an env value only sees the variables before it.
/// `shared`: the proxy's own `istio-data` and workload-certs (or GKE credentials) mounts.
pub fn app_container(c: &mut Value, shared: [&Value; 2]) {
    let Value::Object(m) = c else {
        return;
    };
    let env = [
        env("GRPC_XDS_EXPERIMENTAL_SECURITY_SUPPORT", "true"),
        env("GRPC_XDS_BOOTSTRAP", BOOTSTRAP),
    ];
    let [data, certs] = shared;
    let mounts = [data.clone(), xds_mount(), certs.clone()];
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
