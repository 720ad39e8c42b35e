//! The mutation: an RFC 6902 JSON patch that adds only the proxy container and the annotations
//! the CNI plugin reads. No init container, no capability: the proxy meets Pod Security
//! "restricted" on its own, so the injected pod does whenever the app does.

use super::config::{InjectorConfig, Resources};
use super::decision::{decide, Decision};
use super::quantity::Quantity;
use super::selector::Labels;
use crate::error::{Error, Result};
use crate::pod::{Container, SecurityContext};
use crate::redirect::Selection;
use crate::{MeshProfile, PodInfo, RedirectSpec};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt::Display;

/// One JSON-patch operation. podwire only ever adds (an `add` on an existing member replaces
/// it, RFC 6902 §4.1), so a patch never depends on the exact state of what it does not touch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatchOp {
    pub op: PatchKind,
    pub path: String,
    pub value: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PatchKind {
    Add,
}

impl PatchOp {
    fn add(path: String, value: Value) -> Self {
        PatchOp {
            op: PatchKind::Add,
            path,
            value,
        }
    }
}

/// Escape one JSON-pointer token (RFC 6901): `~` → `~0`, `/` → `~1`.
pub fn escape_token(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

/// Undo [`escape_token`] (`~1` first, so `~01` stays `~1`).
pub fn unescape_token(s: &str) -> String {
    s.replace("~1", "/").replace("~0", "~")
}

/// Decision and patch for one pod object, as the API server (or a manifest) has it.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The pod as read, with its namespace resolved.
    pub pod: PodInfo,
    pub decision: Decision,
    /// Empty when nothing is injected; an error when the pod asks for something podwire
    /// refuses (a bad traffic or resource annotation): the pod must not be admitted as is.
    pub patch: Result<Vec<PatchOp>>,
}

/// Read `pod`, decide, and build the patch when injecting. The namespace is the pod's own,
/// else `request_namespace` (controllers' pods arrive without one), else `default`.
pub fn plan(
    pod: &Value,
    request_namespace: Option<&str>,
    namespace_labels: Option<&Labels>,
    cfg: &InjectorConfig,
    profile: &MeshProfile,
) -> Result<Plan> {
    let mut info = read_pod(pod)?;
    if info.metadata.namespace.is_empty() {
        if let Some(ns) = request_namespace.filter(|n| !n.is_empty()) {
            info.metadata.namespace = ns.to_string();
        }
    }
    let mut decision = decide(&info, namespace_labels, cfg, profile);
    let patch = if decision.inject {
        decision
            .warnings
            .extend(mutation_warnings(&info, cfg, profile));
        injection_patch(pod, &info, cfg, profile)
    } else {
        Ok(Vec::new())
    };
    Ok(Plan {
        pod: info,
        decision,
        patch,
    })
}

/// The slim view of a pod object. Empty `labels:`/`annotations:` in hand-written YAML read as
/// null; they mean "none", not "unreadable".
pub fn read_pod(pod: &Value) -> Result<PodInfo> {
    let Some(obj) = pod.as_object() else {
        return Err(Error::InvalidPod {
            reason: format!("expected an object, got {}", kind_of(pod)),
        });
    };
    let nulls = |section: &str, fields: &[&str]| match obj.get(section) {
        Some(Value::Null) => true,
        Some(Value::Object(m)) => fields.iter().any(|f| m.get(*f).is_some_and(Value::is_null)),
        _ => false,
    };
    let read = |v: &Value| {
        PodInfo::deserialize(v).map_err(|e| Error::InvalidPod {
            reason: e.to_string(),
        })
    };
    let (meta_fields, spec_fields) = (["labels", "annotations"], ["containers"]);
    if !nulls("metadata", &meta_fields) && !nulls("spec", &spec_fields) {
        // The usual case (the API server never sends these nulls): no copy of the pod.
        return read(pod);
    }
    let mut obj = obj.clone();
    for (section, fields) in [("metadata", &meta_fields[..]), ("spec", &spec_fields[..])] {
        match obj.get_mut(section) {
            Some(Value::Object(m)) => {
                for f in fields {
                    if m.get(*f).is_some_and(Value::is_null) {
                        m.remove(*f);
                    }
                }
            }
            Some(Value::Null) => {
                obj.remove(section);
            }
            _ => {}
        }
    }
    read(&Value::Object(obj))
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Things about an injected pod that would surprise its author.
fn mutation_warnings(info: &PodInfo, cfg: &InjectorConfig, profile: &MeshProfile) -> Vec<String> {
    let mut w = Vec::new();
    let (uid, _) = cfg.proxy_ids(profile);
    match info.annotation(profile.interception_mode_key) {
        None | Some("REDIRECT") => {}
        Some(mode) => w.push(format!(
            "annotation {}={mode:?}: podwire only programs REDIRECT, so this pod's traffic will \
             not reach the proxy",
            profile.interception_mode_key
        )),
    }
    for c in &info.spec.containers {
        if c.security_context.as_ref().and_then(|s| s.run_as_user) == Some(i64::from(uid)) {
            w.push(format!(
                "container {} runs as uid {uid}, the proxy's: its traffic bypasses the proxy",
                c.name
            ));
        }
    }
    w
}

/// The patch adding the proxy to `pod` (the object as sent; `info` is its slim view).
/// Refuses, naming the annotation and value, what the CNI plugin or the API server would.
pub fn injection_patch(
    pod: &Value,
    info: &PodInfo,
    cfg: &InjectorConfig,
    profile: &MeshProfile,
) -> Result<Vec<PatchOp>> {
    let (uid, gid) = cfg.proxy_ids(profile);
    // The annotations as they will be: the pod's own, then the config's on top (as Istio).
    let mut annotations = info.metadata.annotations.clone();
    annotations.extend(cfg.injected_annotations.clone());

    // The plugin's own parser, on the pod as it will be: a value it would refuse at pod start
    // is refused now, while the author is still looking.
    let view = PodInfo {
        metadata: crate::pod::PodMeta {
            annotations: annotations.clone(),
            ..Default::default()
        },
        spec: crate::pod::PodSpec {
            containers: vec![Container {
                name: profile.proxy_container.to_string(),
                restart_policy: None,
                security_context: Some(SecurityContext {
                    run_as_user: Some(i64::from(uid)),
                    run_as_group: Some(i64::from(gid)),
                }),
            }],
            ..Default::default()
        },
    };
    let spec = RedirectSpec::from_pod(&view, profile)?;
    let resources = resources(&annotations, cfg, profile)?;

    let mut ops = vec![container_op(
        pod,
        proxy_container(cfg, profile, &resources, uid, gid),
    )];

    let mut writes: BTreeMap<String, String> = cfg.injected_annotations.clone();
    for (k, v) in traffic_annotations(&spec, profile) {
        writes.insert(k.to_string(), v);
    }
    if !annotations.contains_key(profile.interception_mode_key) {
        writes.insert(profile.interception_mode_key.to_string(), "REDIRECT".into());
    }
    writes.insert(
        profile.status_key.to_string(),
        status(cfg.proxy_name(profile)),
    );
    ops.extend(annotation_ops(pod, info, writes));
    Ok(ops)
}

/// Append to `spec.containers`, creating what is missing (a pod without containers is invalid,
/// but the API server validates after mutating admission; the patch must still apply).
fn container_op(pod: &Value, container: Value) -> PatchOp {
    match pod.get("spec") {
        Some(Value::Object(spec)) => match spec.get("containers") {
            Some(Value::Array(_)) => PatchOp::add("/spec/containers/-".into(), container),
            _ => PatchOp::add("/spec/containers".into(), json!([container])),
        },
        _ => PatchOp::add("/spec".into(), json!({ "containers": [container] })),
    }
}

/// One `add` per changed key, or the whole object when the pod has none (a pointer into a
/// missing object would not apply).
fn annotation_ops(pod: &Value, info: &PodInfo, writes: BTreeMap<String, String>) -> Vec<PatchOp> {
    let changed: BTreeMap<String, String> = writes
        .into_iter()
        .filter(|(k, v)| info.annotation(k) != Some(v.as_str()))
        .collect();
    if changed.is_empty() {
        return Vec::new();
    }
    let to_map = |m: BTreeMap<String, String>| -> Value {
        Value::Object(m.into_iter().map(|(k, v)| (k, Value::String(v))).collect())
    };
    match pod.get("metadata") {
        Some(Value::Object(meta)) => match meta.get("annotations") {
            Some(Value::Object(_)) => changed
                .into_iter()
                .map(|(k, v)| {
                    PatchOp::add(
                        format!("/metadata/annotations/{}", escape_token(&k)),
                        Value::String(v),
                    )
                })
                .collect(),
            _ => vec![PatchOp::add(
                "/metadata/annotations".into(),
                to_map(changed),
            )],
        },
        _ => vec![PatchOp::add(
            "/metadata".into(),
            json!({ "annotations": to_map(changed) }),
        )],
    }
}

/// The resolved `traffic.sidecar.istio.io/*` values, written explicitly so the redirection of a
/// running pod never depends on a later change of defaults. Parsing them back gives `spec`.
fn traffic_annotations(spec: &RedirectSpec, profile: &MeshProfile) -> Vec<(&'static str, String)> {
    fn list<T: Display>(items: &[T]) -> String {
        items
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
    fn selection<T: Display>(s: &Selection<T>) -> String {
        match s {
            Selection::All => "*".into(),
            Selection::List(l) => list(l),
        }
    }
    let k = &profile.traffic;
    // Includes always (absent means "all", so an empty list must be spelled out); the other
    // lists only when they hold something.
    let mut out = vec![
        (
            k.include_inbound_ports,
            selection(&spec.include_inbound_ports),
        ),
        (
            k.include_outbound_ip_ranges,
            selection(&spec.include_outbound_ranges),
        ),
    ];
    for (key, value) in [
        (k.exclude_inbound_ports, list(&spec.exclude_inbound_ports)),
        (k.include_outbound_ports, list(&spec.include_outbound_ports)),
        (k.exclude_outbound_ports, list(&spec.exclude_outbound_ports)),
        (
            k.exclude_outbound_ip_ranges,
            list(&spec.exclude_outbound_ranges),
        ),
        (k.exclude_interfaces, list(&spec.exclude_interfaces)),
    ] {
        if !value.is_empty() {
            out.push((key, value));
        }
    }
    out
}

/// Istio's `sidecar.istio.io/status` shape, so Istio's tooling reads it; fields in Istio's order.
fn status(proxy: &str) -> String {
    format!(
        r#"{{"initContainers":null,"containers":[{}],"volumes":null,"imagePullSecrets":null,"revision":"default"}}"#,
        Value::String(proxy.to_string())
    )
}

/// The template's resources with the pod's `sidecar.istio.io/proxy*` overrides, checked.
fn resources(
    annotations: &BTreeMap<String, String>,
    cfg: &InjectorConfig,
    profile: &MeshProfile,
) -> Result<Resources> {
    let keys = &profile.resources;
    let mut r = cfg.proxy.resources.clone();
    for (key, limit, resource) in [
        (keys.cpu_request, false, "cpu"),
        (keys.memory_request, false, "memory"),
        (keys.cpu_limit, true, "cpu"),
        (keys.memory_limit, true, "memory"),
    ] {
        if let Some(v) = annotations.get(key) {
            Quantity::parse(v).map_err(|reason| Error::InvalidAnnotation {
                key: key.to_string(),
                value: v.clone(),
                reason,
            })?;
            let map = if limit {
                &mut r.limits
            } else {
                &mut r.requests
            };
            map.insert(resource.to_string(), v.clone());
        }
    }
    // The API server refuses a request above its limit with a message that does not say which
    // annotation to fix; say it here.
    for (resource, req_key, lim_key) in [
        ("cpu", keys.cpu_request, keys.cpu_limit),
        ("memory", keys.memory_request, keys.memory_limit),
    ] {
        let (Some(req), Some(lim)) = (r.requests.get(resource), r.limits.get(resource)) else {
            continue;
        };
        let (Ok(rq), Ok(lq)) = (Quantity::parse(req), Quantity::parse(lim)) else {
            continue;
        };
        if rq.cmp_value(&lq) == Ordering::Greater {
            let (key, value, reason) = if annotations.contains_key(req_key) {
                (
                    req_key,
                    req,
                    format!("more than the proxy's {resource} limit {lim} (raise {lim_key} too)"),
                )
            } else {
                (
                    lim_key,
                    lim,
                    format!("less than the proxy's {resource} request {req} (set {req_key} too)"),
                )
            };
            return Err(Error::InvalidAnnotation {
                key: key.to_string(),
                value: value.clone(),
                reason,
            });
        }
    }
    Ok(r)
}

fn proxy_container(
    cfg: &InjectorConfig,
    profile: &MeshProfile,
    resources: &Resources,
    uid: u32,
    gid: u32,
) -> Value {
    let t = &cfg.proxy;
    let mut c = Map::new();
    c.insert("name".into(), json!(cfg.proxy_name(profile)));
    c.insert("image".into(), json!(cfg.proxy_image()));
    if let Some(p) = &t.image_pull_policy {
        c.insert("imagePullPolicy".into(), json!(p));
    }
    if !t.args.is_empty() {
        c.insert("args".into(), json!(t.args));
    }
    if !t.env.is_empty() {
        c.insert("env".into(), json!(t.env));
    }
    if !t.ports.is_empty() {
        c.insert("ports".into(), json!(t.ports));
    }
    if !resources.requests.is_empty() || !resources.limits.is_empty() {
        c.insert("resources".into(), json!(resources));
    }
    // Pod Security "restricted", field for field; no capability is added (the CNI plugin does
    // the redirection, so the proxy needs neither NET_ADMIN nor NET_RAW).
    c.insert(
        "securityContext".into(),
        json!({
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
            "privileged": false,
            "readOnlyRootFilesystem": true,
            "runAsGroup": gid,
            "runAsNonRoot": true,
            "runAsUser": uid,
            "seccompProfile": {"type": "RuntimeDefault"}
        }),
    );
    Value::Object(c)
}

/// Apply `add` operations the way the API server does (RFC 6902 §4.1): the parent must exist;
/// an object member is added or replaced; `-` appends to an array.
pub fn apply_patch(doc: &mut Value, ops: &[PatchOp]) -> std::result::Result<(), String> {
    for op in ops {
        let PatchKind::Add = op.op;
        let path = op
            .path
            .strip_prefix('/')
            .ok_or_else(|| format!("{}: a pointer starts with /", op.path))?;
        let tokens: Vec<String> = path.split('/').map(unescape_token).collect();
        let (last, parents) = tokens
            .split_last()
            .ok_or_else(|| format!("{}: empty pointer", op.path))?;
        let mut cur = &mut *doc;
        for t in parents {
            cur = match cur {
                Value::Object(m) => m.get_mut(t),
                Value::Array(a) => t.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
                _ => None,
            }
            .ok_or_else(|| format!("{}: {t:?} does not exist", op.path))?;
        }
        match cur {
            Value::Object(m) => {
                m.insert(last.clone(), op.value.clone());
            }
            Value::Array(a) if last == "-" => a.push(op.value.clone()),
            Value::Array(a) => {
                let i = last
                    .parse::<usize>()
                    .ok()
                    .filter(|i| *i <= a.len())
                    .ok_or_else(|| format!("{}: bad array index {last:?}", op.path))?;
                a.insert(i, op.value.clone());
            }
            _ => return Err(format!("{}: parent is not a container", op.path)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_tokens_escape_and_unescape() {
        assert_eq!(
            escape_token("sidecar.istio.io/status"),
            "sidecar.istio.io~1status"
        );
        assert_eq!(escape_token("a~b/c"), "a~0b~1c");
        assert_eq!(unescape_token("a~0b~1c"), "a~b/c");
        // `~01` is `~1` literally, not `/`.
        assert_eq!(unescape_token("~01"), "~1");
    }

    #[test]
    fn resolved_traffic_annotations_parse_back_to_the_same_spec() {
        let p = MeshProfile::istio();
        let mut pod = PodInfo::default();
        for (k, v) in [
            ("traffic.sidecar.istio.io/includeInboundPorts", ""),
            (
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                "10.1.0.0/16, fd00::/8,",
            ),
            ("traffic.sidecar.istio.io/excludeInterfaces", "eth1"),
            ("traffic.sidecar.istio.io/includeOutboundPorts", "3306"),
        ] {
            pod.metadata.annotations.insert(k.into(), v.into());
        }
        let spec = RedirectSpec::from_pod(&pod, &p).expect("valid");
        let mut again = PodInfo::default();
        for (k, v) in traffic_annotations(&spec, &p) {
            again.metadata.annotations.insert(k.into(), v);
        }
        assert_eq!(RedirectSpec::from_pod(&again, &p), Ok(spec));
    }

    #[test]
    fn resource_overrides_are_checked() {
        let p = MeshProfile::istio();
        let cfg = InjectorConfig::default();
        let ann = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let r = resources(
            &ann(&[
                ("sidecar.istio.io/proxyCPU", "50m"),
                ("sidecar.istio.io/proxyMemoryLimit", "2Gi"),
            ]),
            &cfg,
            &p,
        )
        .expect("valid");
        assert_eq!(r.requests["cpu"], "50m");
        assert_eq!(r.limits["memory"], "2Gi");
        for (pairs, key, why) in [
            (
                vec![("sidecar.istio.io/proxyCPU", "lots")],
                "sidecar.istio.io/proxyCPU",
                "quantity",
            ),
            (
                vec![("sidecar.istio.io/proxyCPU", "3")],
                "sidecar.istio.io/proxyCPU",
                "limit 2000m",
            ),
            (
                vec![("sidecar.istio.io/proxyMemoryLimit", "64Mi")],
                "sidecar.istio.io/proxyMemoryLimit",
                "request 128Mi",
            ),
        ] {
            match resources(&ann(&pairs), &cfg, &p) {
                Err(Error::InvalidAnnotation { key: k, reason, .. }) => {
                    assert_eq!(k, key);
                    assert!(reason.contains(why), "{reason}");
                }
                other => panic!("{pairs:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn apply_follows_rfc6902_add() {
        let mut doc = json!({"metadata": {"annotations": {"a": "1"}}, "spec": {"containers": [{"name": "app"}]}});
        apply_patch(
            &mut doc,
            &[
                PatchOp::add("/metadata/annotations/x~1y".into(), json!("2")),
                PatchOp::add("/metadata/annotations/a".into(), json!("3")),
                PatchOp::add("/spec/containers/-".into(), json!({"name": "p"})),
                PatchOp::add("/spec/containers/0".into(), json!({"name": "first"})),
            ],
        )
        .expect("applies");
        assert_eq!(
            doc,
            json!({"metadata": {"annotations": {"a": "3", "x/y": "2"}},
                   "spec": {"containers": [{"name": "first"}, {"name": "app"}, {"name": "p"}]}})
        );
        assert!(apply_patch(&mut doc, &[PatchOp::add("/nope/x".into(), json!(1))]).is_err());
    }
}
