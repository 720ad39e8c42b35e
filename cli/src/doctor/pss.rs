//! Pod Security Standards, for the container security settings only (what the proxy brings
//! and what the app containers bring): the pod is admitted only if every container passes
//! the namespace's `pod-security.kubernetes.io/enforce` level. Host namespaces and volumes are
//! not the injection's business and are left to the API server.

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Privileged,
    Baseline,
    Restricted,
}

impl Level {
    pub fn parse(s: &str) -> Option<Level> {
        match s {
            "privileged" => Some(Level::Privileged),
            "baseline" => Some(Level::Baseline),
            "restricted" => Some(Level::Restricted),
            _ => None,
        }
    }
}

/// Capabilities baseline allows to be added.
const BASELINE_CAPS: [&str; 13] = [
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// `(container, what is wrong)` for every container of `pod` that `level` refuses.
pub fn violations(pod: &Value, level: Level) -> Vec<(String, String)> {
    if level == Level::Privileged {
        return Vec::new();
    }
    let pod_sc = pod.pointer("/spec/securityContext").unwrap_or(&Value::Null);
    let mut out = Vec::new();
    for list in ["initContainers", "containers", "ephemeralContainers"] {
        let containers = pod
            .pointer(&format!("/spec/{list}"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for c in &containers {
            let name = c.get("name").and_then(Value::as_str).unwrap_or("?");
            for why in container_violations(c, pod_sc, level) {
                out.push((name.to_string(), why));
            }
        }
    }
    out
}

fn container_violations(c: &Value, pod_sc: &Value, level: Level) -> Vec<String> {
    let sc = c.get("securityContext").unwrap_or(&Value::Null);
    let get = |v: &Value, f: &str| v.get(f).cloned().unwrap_or(Value::Null);
    let mut w = Vec::new();
    // Baseline.
    if get(sc, "privileged") == Value::Bool(true) {
        w.push("privileged: true".to_string());
    }
    let added: Vec<String> = sc
        .pointer("/capabilities/add")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let beyond: Vec<&String> = added
        .iter()
        .filter(|c| !BASELINE_CAPS.contains(&c.as_str()))
        .collect();
    if !beyond.is_empty() {
        w.push(format!(
            "capabilities.add {beyond:?} (baseline allows only the default set)"
        ));
    }
    let seccomp = |v: &Value| {
        v.pointer("/seccompProfile/type")
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let (c_seccomp, p_seccomp) = (seccomp(sc), seccomp(pod_sc));
    if c_seccomp.as_deref() == Some("Unconfined") || p_seccomp.as_deref() == Some("Unconfined") {
        w.push("seccompProfile.type: Unconfined".to_string());
    }
    if level == Level::Baseline {
        return w;
    }
    // Restricted.
    if get(sc, "allowPrivilegeEscalation") != Value::Bool(false) {
        w.push(match get(sc, "allowPrivilegeEscalation") {
            Value::Bool(true) => "allowPrivilegeEscalation: true (must be false)".to_string(),
            _ => "allowPrivilegeEscalation not set to false".to_string(),
        });
    }
    let drops_all = sc
        .pointer("/capabilities/drop")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|c| c.as_str() == Some("ALL")));
    if !drops_all {
        w.push("capabilities.drop does not include ALL".to_string());
    }
    if let Some(extra) = added.iter().find(|c| c.as_str() != "NET_BIND_SERVICE") {
        w.push(format!(
            "capabilities.add {extra} (restricted allows only NET_BIND_SERVICE)"
        ));
    }
    // The container's setting wins over the pod's.
    let non_root = match (get(sc, "runAsNonRoot"), get(pod_sc, "runAsNonRoot")) {
        (Value::Bool(b), _) => b,
        (_, Value::Bool(b)) => b,
        _ => false,
    };
    if !non_root {
        w.push("runAsNonRoot is not true (container or pod securityContext)".to_string());
    }
    let uid = match (get(sc, "runAsUser"), get(pod_sc, "runAsUser")) {
        (Value::Number(n), _) => n.as_i64(),
        (_, Value::Number(n)) => n.as_i64(),
        _ => None,
    };
    if uid == Some(0) {
        w.push("runAsUser: 0 (root)".to_string());
    }
    match c_seccomp.or(p_seccomp).as_deref() {
        Some("RuntimeDefault" | "Localhost") => {}
        Some(other) => w.push(format!(
            "seccompProfile.type {other} (must be RuntimeDefault or Localhost)"
        )),
        None => w.push("seccompProfile.type not set (must be RuntimeDefault or Localhost)".into()),
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn restricted_reads_container_then_pod_settings() {
        let pod = json!({"spec": {
        "securityContext": {"runAsNonRoot": true, "runAsUser": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [
            {"name": "ok", "securityContext": {"allowPrivilegeEscalation": false,
                                               "capabilities": {"drop": ["ALL"]}}},
            {"name": "root", "securityContext": {"allowPrivilegeEscalation": false,
                                                 "runAsUser": 0,
                                                 "capabilities": {"drop": ["ALL"]}}},
            {"name": "bare"}
        ]}});
        let v = violations(&pod, Level::Restricted);
        assert!(v.iter().all(|(c, _)| c != "ok"), "{v:?}");
        assert!(
            v.contains(&("root".into(), "runAsUser: 0 (root)".into())),
            "{v:?}"
        );
        assert!(v
            .iter()
            .any(|(c, w)| c == "bare" && w.contains("allowPrivilegeEscalation")));
        assert!(violations(&pod, Level::Baseline).is_empty());
        assert!(violations(&pod, Level::Privileged).is_empty());
    }

    #[test]
    fn baseline_refuses_privileged_and_extra_capabilities() {
        let pod = json!({"spec": {"containers": [
            {"name": "p", "securityContext": {"privileged": true,
                                              "capabilities": {"add": ["NET_ADMIN"]}}}]}});
        let v = violations(&pod, Level::Baseline);
        assert_eq!(v.len(), 2, "{v:?}");
    }
}
