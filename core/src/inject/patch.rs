//! The mutation: an RFC 6902 JSON patch that adds only the proxy container and the annotations
//! the CNI plugin reads. No init container, no capability: the proxy meets Pod Security
//! "restricted" on its own, so the injected pod does whenever the app does.

use super::config::InjectorConfig;
use super::decision::{decide, Decision};
use super::istio::{self, Overrides, Rendered, Workload};
use super::json::Json;
use super::selector::Labels;
use crate::error::{Error, Result};
use crate::pod::Container;
use crate::{MeshProfile, PodInfo, RedirectSpec};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// One JSON-patch operation. podwire only ever adds (an `add` on an existing member replaces
/// it, RFC 6902 §4.1): no operation can fail on the object the API server patches. A map the
/// render drops a key from (the Prometheus merge) is added whole.
/// Written as JSON with serde_json; `value.to_value()` reads the value anywhere else.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatchOp {
    pub op: PatchKind,
    pub path: String,
    pub value: Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PatchKind {
    Add,
}

impl PatchOp {
    fn add(path: String, value: impl Into<Json>) -> Self {
        PatchOp {
            op: PatchKind::Add,
            path,
            value: value.into(),
        }
    }
}

/// Escape one JSON-pointer token (RFC 6901): `~` → `~0`, `/` → `~1`.
pub fn escape_token(s: &str) -> String {
    // One pass, one allocation: most annotation keys hold a `/`.
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        match c {
            '~' => out.push_str("~0"),
            '/' => out.push_str("~1"),
            c => out.push(c),
        }
    }
    out
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
    plan_in(pod, None, request_namespace, namespace_labels, cfg, profile)
}

/// [`plan`] for a pod template of a known workload (a Deployment's, a Job's, ... as
/// `podwire inject` reads them); `None` derives the workload from the pod, as the webhook does.
pub fn plan_in(
    pod: &Value,
    workload: Option<&Workload>,
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
        let derived;
        let workload = match workload {
            Some(w) => w,
            None => {
                derived = workload_of(pod, &info);
                &derived
            }
        };
        injection(pod, workload, cfg, profile).map(|(ops, warnings)| {
            decision.warnings.extend(warnings);
            ops
        })
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

/// The patch adding the proxy to `pod` (the object as sent; `info` is its slim view).
/// Refuses, naming the annotation and value, what the CNI plugin or the API server would.
pub fn injection_patch(
    pod: &Value,
    info: &PodInfo,
    cfg: &InjectorConfig,
    profile: &MeshProfile,
) -> Result<Vec<PatchOp>> {
    let workload = workload_of(pod, info);
    injection(pod, &workload, cfg, profile).map(|(ops, _)| ops)
}

/// The workload Istio would name for `pod` (owner reference heuristics), in `info`'s namespace.
fn workload_of(pod: &Value, info: &PodInfo) -> Workload {
    let mut w = Workload::from_pod(pod);
    if w.namespace.is_empty() {
        w.namespace = info.metadata.namespace.clone();
    }
    w
}

/// The injected pod, as Istio's sidecar template (istio-cni case, no init container) renders
/// it with the config's Istio values and mesh config, plus podwire's `proxy` overrides.
pub fn render_pod(
    pod: &Value,
    workload: &Workload,
    cfg: &InjectorConfig,
    profile: &MeshProfile,
) -> Result<Rendered> {
    // A hostile traffic annotation is refused before anything is rendered, quoting the pod's
    // own value (the plugin's parser, as it will run at pod start).
    // Only the traffic annotations, the ones the plugin's parser reads, are copied.
    let traffic = profile.traffic.all();
    let mut own = PodInfo::default();
    if let Some(Value::Object(a)) = istio::member_at(pod, &["metadata", "annotations"]) {
        for k in traffic {
            if let Some(v) = a.get(k).and_then(Value::as_str) {
                own.metadata
                    .annotations
                    .insert(k.to_string(), v.to_string());
            }
        }
    }
    RedirectSpec::from_pod(&own, profile)?;
    let built;
    let inputs = match &cfg.render_inputs {
        Some(i) if i.matches(cfg, profile) => &**i,
        _ => {
            built = RenderInputs::new(cfg, profile)?;
            &built
        }
    };
    let (settings, overrides) = (&inputs.settings, &inputs.overrides);
    let mut rendered = istio::render(
        pod,
        workload,
        settings,
        overrides,
        &cfg.injected_annotations,
        &inputs.prebuilt,
    )?;
    // The plugin's own parser, on the pod as it will be: a value it would refuse at pod start
    // is refused now, while the author is still looking.
    let mut view = PodInfo::default();
    for k in traffic {
        if let Some(v) = rendered.annotations.get(k).and_then(Value::as_str) {
            view.metadata
                .annotations
                .insert(k.to_string(), v.to_string());
        }
    }
    if let Some(proxy) = rendered.proxy(&overrides.name) {
        // Only what the plugin reads of it, read straight from its JSON.
        let bad = |e: serde_json::Error| Error::InvalidPod {
            reason: format!("the proxy container as merged: {e}"),
        };
        // A member given as null is absent, as when the whole container is read.
        let c = Container {
            name: proxy.str_member("name").unwrap_or_default().to_string(),
            restart_policy: proxy
                .read_member::<Option<String>>("restartPolicy")
                .transpose()
                .map_err(bad)?
                .flatten(),
            security_context: proxy
                .read_member::<Option<crate::pod::SecurityContext>>("securityContext")
                .transpose()
                .map_err(bad)?
                .flatten(),
            ..Container::default()
        };
        view.spec.containers.push(c);
    }
    let redirect = RedirectSpec::from_pod(&view, profile)?;
    // The proxy as the plugin's parser read it above.
    if let Some(proxy) = view.spec.containers.first() {
        // The native layout's proxy must be a sidecar: as a plain init container (the pod's
        // own istio-proxy overriding restartPolicy) it never exits and the pod never starts.
        let policy = proxy.restart_policy.as_deref();
        if rendered.native && policy != Some("Always") {
            return Err(Error::InvalidPod {
                reason: format!(
                    "container {} sets restartPolicy {:?}: as a native sidecar the proxy needs \
                     restartPolicy Always, else it blocks the pod's start; remove restartPolicy \
                     from the pod's own {}",
                    overrides.name,
                    policy.unwrap_or(""),
                    overrides.name
                ),
            });
        }
        if rendered.template.redirected() {
            let ids = Identities::of_pod(pod);
            let own_uid = proxy.security_context.as_ref().and_then(|s| s.run_as_user);
            check_proxy_uid(own_uid, &ids, &redirect, &overrides.name)?;
            let w = app_id_warnings(pod, &ids, &redirect, &overrides.name);
            rendered.warnings.extend(w);
        }
    }
    Ok(rendered)
}

/// The pod-level `runAsUser` / `runAsGroup`, which a container without its own runs as.
struct Identities {
    uid: Option<i64>,
    gid: Option<i64>,
}

impl Identities {
    fn of_pod(pod: &Value) -> Self {
        Identities::of(istio::member_at(pod, &["spec", "securityContext"]))
    }

    fn of(sc: Option<&Value>) -> Self {
        let id = |k: &str| sc.and_then(|s| s.get(k)).and_then(Value::as_i64);
        Identities {
            uid: id("runAsUser"),
            gid: id("runAsGroup"),
        }
    }

    /// A container's own, falling back to the pod's (kubelet's rule); `None`: the image's.
    fn effective(container: &Value, pod: &Identities) -> Self {
        let own = Identities::of(container.get("securityContext"));
        Identities {
            uid: own.uid.or(pod.uid),
            gid: own.gid.or(pod.gid),
        }
    }
}

/// The uid the proxy will run as must be the one podwire-cni exempts, which it reads from the
/// proxy container alone: a proxy that runs as the pod's uid instead would have its own
/// traffic sent back to itself.
fn check_proxy_uid(
    own_uid: Option<i64>,
    pod: &Identities,
    redirect: &RedirectSpec,
    name: &str,
) -> Result<()> {
    match own_uid.or(pod.uid) {
        Some(uid) if uid != i64::from(redirect.proxy_uid) => Err(Error::InvalidPod {
            reason: format!(
                "container {name} would run as uid {uid} (the pod's securityContext.runAsUser) \
                 but podwire-cni exempts uid {} from redirection, which would loop the proxy's \
                 own traffic back to it: set securityContext.runAsUser on {name}",
                redirect.proxy_uid
            ),
        }),
        _ => Ok(()),
    }
}

/// App containers (and sidecars the pod starts beside them) whose traffic podwire-cni will
/// let past the proxy: they run as the proxy's uid or group. Plain init containers are left
/// out: running one as the proxy's uid is Istio's documented way to let it reach the network
/// before the proxy starts.
fn app_id_warnings(
    pod: &Value,
    pod_ids: &Identities,
    redirect: &RedirectSpec,
    name: &str,
) -> Vec<String> {
    let list = |k: &str| {
        istio::member_at(pod, &["spec", k])
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
    };
    let sidecars = list("initContainers")
        .iter()
        .filter(|c| c.get("restartPolicy").and_then(Value::as_str) == Some("Always"));
    let mut w = Vec::new();
    for c in list("containers").iter().chain(sidecars) {
        let Some(cname) = c.get("name").and_then(Value::as_str) else {
            continue;
        };
        if cname == name {
            continue;
        }
        let runs = Identities::effective(c, pod_ids);
        if runs.uid == Some(i64::from(redirect.proxy_uid)) {
            w.push(format!(
                "container {cname} runs as uid {}, the proxy's: its traffic bypasses the proxy",
                redirect.proxy_uid
            ));
        } else if runs.gid == Some(i64::from(redirect.proxy_gid)) {
            w.push(format!(
                "container {cname} runs as gid {}, the proxy's group: its traffic bypasses the \
                 proxy",
                redirect.proxy_gid
            ));
        }
    }
    w
}

/// What a render reads from the config alone, built once per config (see
/// [`InjectorConfig::prepared`]) instead of per pod.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderInputs {
    /// Istio's settings, with the config file's `proxy.resources` standing in for the
    /// values' `global.proxy.resources`, as a whole (the pod's sidecar.istio.io/proxy*
    /// annotations still win over either).
    pub settings: std::sync::Arc<istio::Resolved>,
    pub overrides: Overrides,
    /// The sidecar's settings-only parts.
    pub prebuilt: istio::Prebuilt,
    /// What these were built from: the config's `proxy` section, its resolved settings, the
    /// profile's proxy fields.
    proxy: super::config::ProxyTemplate,
    resolved: Option<std::sync::Arc<istio::Resolved>>,
    proxy_container: &'static str,
    proxy_ids: (u32, u32),
}

impl RenderInputs {
    pub fn new(cfg: &InjectorConfig, profile: &MeshProfile) -> Result<Self> {
        let mut settings = cfg.istio()?;
        if let Some(r) = &cfg.proxy.resources {
            std::sync::Arc::make_mut(&mut settings).resources = Some(json!(r));
        }
        let (uid, gid) = cfg.proxy_ids(profile);
        let overrides = Overrides {
            name: cfg.proxy_name(profile).to_string(),
            image: cfg.proxy.image.clone(),
            uid,
            gid,
            container: config_overlay(cfg),
        };
        Ok(RenderInputs {
            prebuilt: istio::Prebuilt::new(&settings, &overrides),
            settings,
            overrides,
            proxy: cfg.proxy.clone(),
            resolved: cfg.resolved.clone(),
            proxy_container: profile.proxy_container,
            proxy_ids: (profile.proxy_uid, profile.proxy_gid),
        })
    }

    /// Whether these are still `cfg`'s for `profile` (a config changed after
    /// [`InjectorConfig::prepared`] gets fresh ones).
    fn matches(&self, cfg: &InjectorConfig, profile: &MeshProfile) -> bool {
        self.proxy_container == profile.proxy_container
            && self.proxy_ids == (profile.proxy_uid, profile.proxy_gid)
            && self.proxy == cfg.proxy
            && match (&self.resolved, &cfg.resolved) {
                (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
                _ => false,
            }
    }
}

/// Patch and warnings for `pod` injected as part of `workload`.
pub fn injection(
    pod: &Value,
    workload: &Workload,
    cfg: &InjectorConfig,
    profile: &MeshProfile,
) -> Result<(Vec<PatchOp>, Vec<String>)> {
    let rendered = render_pod(pod, workload, cfg, profile)?;
    let warnings = rendered.warnings.clone();
    Ok((diff_ops(pod, rendered), warnings))
}

/// The config file's `proxy` section as a partial container merged over the template.
fn config_overlay(cfg: &InjectorConfig) -> Option<Value> {
    let t = &cfg.proxy;
    let mut m = Map::new();
    if let Some(p) = &t.image_pull_policy {
        m.insert("imagePullPolicy".into(), json!(p));
    }
    if !t.args.is_empty() {
        m.insert("args".into(), json!(t.args));
    }
    if !t.env.is_empty() {
        m.insert("env".into(), json!(t.env));
    }
    if !t.ports.is_empty() {
        m.insert("ports".into(), json!(t.ports));
    }
    (!m.is_empty()).then_some(Value::Object(m))
}

/// `add` operations turning `old` into the rendered pod: labels and annotations key by key
/// (whole when the pod has none or the render dropped one of its keys), the rewritten spec
/// lists whole.
fn diff_ops(old: &Value, r: Rendered) -> Vec<PatchOp> {
    // The rendered values move into the operations: nothing is copied twice.
    let Rendered {
        labels,
        annotations,
        spec: spec_fields,
        ..
    } = r;
    let mut ops = Vec::new();
    match old.get("metadata").and_then(Value::as_object) {
        None => ops.push(PatchOp::add(
            "/metadata".into(),
            json!({"labels": labels, "annotations": annotations}),
        )),
        Some(meta) => {
            for (k, new) in [("labels", labels), ("annotations", annotations)] {
                match meta.get(k).and_then(Value::as_object) {
                    // A key the render dropped (the Prometheus merge clears the pod's other
                    // spellings): the map is replaced whole, still only adds.
                    Some(m) if m.keys().any(|ik| !new.contains_key(ik)) => {
                        ops.push(PatchOp::add(format!("/metadata/{k}"), Value::Object(new)))
                    }
                    None => ops.push(PatchOp::add(format!("/metadata/{k}"), Value::Object(new))),
                    Some(m) => {
                        for (ik, iv) in new {
                            if m.get(&ik) != Some(&iv) {
                                ops.push(PatchOp::add(
                                    format!("/metadata/{k}/{}", escape_token(&ik)),
                                    iv,
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    match old.get("spec").and_then(Value::as_object) {
        None => ops.push(PatchOp::add(
            "/spec".into(),
            Json::Object(
                spec_fields
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            ),
        )),
        Some(spec) => {
            for (k, v) in spec_fields {
                if !spec.get(k).is_some_and(|old| v.eq_value(old)) {
                    ops.push(PatchOp::add(format!("/spec/{k}"), v));
                }
            }
        }
    }
    ops
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
        let value = op.value.to_value();
        match cur {
            Value::Object(m) => {
                m.insert(last.clone(), value);
            }
            Value::Array(a) if last == "-" => a.push(value),
            Value::Array(a) => {
                let i = last
                    .parse::<usize>()
                    .ok()
                    .filter(|i| *i <= a.len())
                    .ok_or_else(|| format!("{}: bad array index {last:?}", op.path))?;
                a.insert(i, value);
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
    fn a_proxy_that_would_run_as_the_pods_uid_is_refused() {
        let spec =
            RedirectSpec::from_pod(&PodInfo::default(), &MeshProfile::istio()).expect("spec");
        let pod = Identities::of_pod(&json!({"spec": {"securityContext": {"runAsUser": 1000}}}));
        // No uid of its own: kubelet runs it as the pod's 1000, the plugin exempts 1337.
        let err = check_proxy_uid(None, &pod, &spec, "istio-proxy").expect_err("refused");
        let msg = err.to_string();
        assert!(
            msg.contains("uid 1000") && msg.contains("exempts uid 1337"),
            "{msg}"
        );
        // Its own uid wins over the pod's; so does no uid anywhere (the image's, as the plugin
        // assumes the profile's).
        assert!(check_proxy_uid(Some(1337), &pod, &spec, "istio-proxy").is_ok());
        let nobody = Identities::of_pod(&json!({"spec": {}}));
        assert!(check_proxy_uid(None, &nobody, &spec, "istio-proxy").is_ok());
    }

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
