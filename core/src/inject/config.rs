//! The injector's configuration: Istio's sidecar-injector keys (`policy`,
//! `alwaysInjectSelector`, `neverInjectSelector`, `injectedAnnotations`) plus podwire's own
//! (`namespaceSelector`, `ignoredNamespaces`, `proxy`). The binaries read it from YAML; this
//! module only types and checks it.

use super::quantity::Quantity;
use super::selector::LabelSelector;
use crate::error::{Error, Result};
use crate::MeshProfile;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;

/// Image used when neither the config nor Istio's values name one (`global.hub`,
/// `global.tag`, `global.proxy.image` defaults in [`super::istio`]).
pub const DEFAULT_PROXY_IMAGE: &str = "docker.io/istio/proxyv2:1.28.0";

/// Namespaces never injected, whatever the config says (the Kubernetes system namespaces and
/// kind's storage provisioner): their pods must start even when the mesh is broken.
pub const SYSTEM_NAMESPACES: [&str; 4] = [
    "kube-system",
    "kube-public",
    "kube-node-lease",
    "local-path-storage",
];

/// Every top-level key podwire reads; anything else in the file is reported, not used.
pub const KNOWN_KEYS: [&str; 9] = [
    "policy",
    "values",
    "mesh",
    "alwaysInjectSelector",
    "neverInjectSelector",
    "injectedAnnotations",
    "namespaceSelector",
    "ignoredNamespaces",
    "proxy",
];

/// Keys of Istio's own injector config that podwire deliberately does not use.
pub const ISTIO_TEMPLATE_KEYS: [&str; 4] = ["template", "templates", "defaultTemplates", "aliases"];

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InjectorConfig {
    /// `enabled` (default) or `disabled`; anything else disables default injection.
    #[serde(default)]
    pub policy: Policy,
    #[serde(default)]
    pub always_inject_selector: Vec<LabelSelector>,
    #[serde(default)]
    pub never_inject_selector: Vec<LabelSelector>,
    /// Added to every injected pod (overwriting the pod's own value, as Istio does).
    #[serde(default)]
    pub injected_annotations: BTreeMap<String, String>,
    /// The webhook's namespaceSelector; default: `matchLabels: {istio-injection: enabled}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Never injected, on top of [`SYSTEM_NAMESPACES`].
    #[serde(default)]
    pub ignored_namespaces: Vec<String>,
    #[serde(default)]
    pub proxy: ProxyTemplate,
    /// Istio's Helm values (the `values` of the `istio-sidecar-injector` ConfigMap) as the
    /// template reads them; the binaries merge the cluster's with the file's (the file wins).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub values: Value,
    /// Istio's MeshConfig (the `mesh` of the `istio` ConfigMap), merged the same way.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub mesh: Value,
    /// `values` and `mesh` resolved once by [`InjectorConfig::prepared`], so a request does
    /// not read them again. Not part of the file.
    #[serde(skip)]
    pub resolved: Option<std::sync::Arc<super::istio::Resolved>>,
    /// What every render reads from this config (Istio's settings with the file's
    /// `proxy.resources` applied, podwire's proxy overrides), built once by
    /// [`InjectorConfig::prepared`] for the default profile. Not part of the file.
    #[serde(skip)]
    pub render_inputs: Option<std::sync::Arc<super::patch::RenderInputs>>,
    /// What Istio's `ENABLE_NATIVE_SIDECARS=auto` means in this cluster, per pod, from the
    /// webhook's node watch; `None` (offline, no watch): native. Applied by
    /// [`InjectorConfig::prepared`]. Not part of the file.
    #[serde(skip)]
    pub nodes: Option<std::sync::Arc<super::istio::NodeSidecars>>,
}

/// The default injection policy. Kept as written when unrecognized so messages can quote it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Policy {
    #[default]
    Enabled,
    Disabled,
    Unrecognized(String),
}

impl Policy {
    pub fn as_str(&self) -> &str {
        match self {
            Policy::Enabled => "enabled",
            Policy::Disabled => "disabled",
            Policy::Unrecognized(s) => s,
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Policy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        // Exact match, as Istio compares: `Enabled` or `on` are unrecognized.
        Ok(match String::deserialize(d)?.as_str() {
            "enabled" => Policy::Enabled,
            "disabled" => Policy::Disabled,
            other => Policy::Unrecognized(other.to_string()),
        })
    }
}

impl Serialize for Policy {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The proxy container the injector adds. Unset fields follow the mesh profile.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyTemplate {
    /// Container name (default: the profile's, `istio-proxy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Replaces the template's ports when given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
    /// runAsUser / runAsGroup of the proxy (default: the profile's, 1337); the CNI plugin
    /// exempts this uid/gid from redirection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// Taken as a whole when given (so limits can be left out on purpose); else Istio's
    /// `values.global.proxy.resources` (100m/128Mi requests, 2000m/1024Mi limits by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub container_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Passed through as written (fieldRef, secretKeyRef, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, String>,
}

impl InjectorConfig {
    /// The webhook's namespaceSelector (opt-in on the profile's namespace label by default).
    pub fn namespace_selector(&self, profile: &MeshProfile) -> LabelSelector {
        self.namespace_selector
            .clone()
            .unwrap_or_else(|| LabelSelector::match_label(profile.namespace_label, "enabled"))
    }

    /// Why `namespace` is never injected, if it is not.
    pub fn ignored_namespace(&self, namespace: &str) -> Option<&'static str> {
        if SYSTEM_NAMESPACES.contains(&namespace) {
            Some("is never injected")
        } else if self.ignored_namespaces.iter().any(|n| n == namespace) {
            Some("is never injected (ignoredNamespaces)")
        } else {
            None
        }
    }

    pub fn proxy_name<'a>(&'a self, profile: &'a MeshProfile) -> &'a str {
        self.proxy
            .name
            .as_deref()
            .unwrap_or(profile.proxy_container)
    }

    /// The image the config file names, if any (else Istio's values decide).
    pub fn proxy_image(&self) -> Option<&str> {
        self.proxy.image.as_deref()
    }

    /// Istio's settings as read from `values` and `mesh`, checked (the prepared copy when
    /// there is one).
    pub fn istio(&self) -> Result<std::sync::Arc<super::istio::Resolved>> {
        if let Some(r) = &self.resolved {
            return Ok(r.clone());
        }
        super::istio::IstioSettings {
            values: &self.values,
            mesh: &self.mesh,
        }
        .resolve()
        .map(std::sync::Arc::new)
    }

    /// Whether the sidecar layout is Istio's `auto` with no node verdict applied (before
    /// [`InjectorConfig::prepared`], or without a node watch).
    pub fn native_is_auto(&self) -> bool {
        self.resolved
            .as_ref()
            .is_some_and(|r| r.native == super::istio::NativeMode::Auto && r.nodes.is_none())
    }

    /// The config with Istio's settings resolved once (call after changing `values`/`mesh`).
    pub fn prepared(mut self) -> Result<Self> {
        self.resolved = None;
        self.render_inputs = None;
        let mut r = self.istio()?;
        if r.native == super::istio::NativeMode::Auto && self.nodes.is_some() {
            std::sync::Arc::make_mut(&mut r).nodes = self.nodes.clone();
        }
        self.resolved = Some(r);
        let inputs = super::patch::RenderInputs::new(&self, &MeshProfile::istio())?;
        self.render_inputs = Some(std::sync::Arc::new(inputs));
        Ok(self)
    }

    /// (uid, gid); without a gid the group follows the uid, as the plugin assumes.
    pub fn proxy_ids(&self, profile: &MeshProfile) -> (u32, u32) {
        match (self.proxy.uid, self.proxy.gid) {
            (Some(u), Some(g)) => (u, g),
            (Some(u), None) => (u, u),
            (None, Some(g)) => (profile.proxy_uid, g),
            (None, None) => (profile.proxy_uid, profile.proxy_gid),
        }
    }

    /// Everything a loaded file must satisfy; the first problem found, naming its field.
    pub fn validate(&self, profile: &MeshProfile) -> Result<()> {
        let err = |field: String, reason: String| Error::InvalidConfig { field, reason };
        for (list, name) in [
            (&self.always_inject_selector, "alwaysInjectSelector"),
            (&self.never_inject_selector, "neverInjectSelector"),
        ] {
            for (i, sel) in list.iter().enumerate() {
                sel.validate(&format!("{name}[{i}]"))?;
            }
        }
        if let Some(sel) = &self.namespace_selector {
            sel.validate("namespaceSelector")?;
        }
        for (k, v) in &self.injected_annotations {
            if k.is_empty() || k.len() > 316 || k.chars().any(|c| c.is_whitespace()) {
                return Err(err(
                    "injectedAnnotations".into(),
                    format!("{k:?} is not an annotation key"),
                ));
            }
            if k == profile.status_key {
                return Err(err(
                    "injectedAnnotations".into(),
                    format!("{k} is written by the injector itself"),
                ));
            }
            // Written over every injected pod's own, these values would switch podwire-cni
            // off for all of them, with no per-pod warning (the mode belongs in the mesh's
            // defaultConfig.interceptionMode, which the render reports).
            let switches_off = (k == profile.inject_key && v == "false")
                || (k == profile.interception_mode_key && v != "REDIRECT");
            if switches_off {
                return Err(err(
                    "injectedAnnotations".into(),
                    format!(
                        "{k}: {v:?} would leave every injected pod unredirected by podwire-cni"
                    ),
                ));
            }
        }
        let name = self.proxy_name(profile);
        // The only name the plugin recognises (a valid container name, too).
        if name != profile.proxy_container {
            return Err(err(
                "proxy.name".into(),
                format!(
                    "{name:?}: podwire-cni redirects only pods with a {} container, so every \
                     injected pod would run unredirected; remove proxy.name",
                    profile.proxy_container
                ),
            ));
        }
        if self.proxy_image().is_some_and(|i| i.trim().is_empty()) {
            return Err(err("proxy.image".into(), "must not be empty".into()));
        }
        for (field, id) in [("proxy.uid", self.proxy.uid), ("proxy.gid", self.proxy.gid)] {
            match id {
                Some(0) => {
                    return Err(err(
                        field.into(),
                        "0 (root) would exempt every root process from redirection".into(),
                    ))
                }
                Some(u32::MAX) => return Err(err(field.into(), "out of range".into())),
                _ => {}
            }
        }
        for (i, p) in self.proxy.ports.iter().enumerate() {
            if p.container_port == 0 {
                return Err(err(
                    format!("proxy.ports[{i}].containerPort"),
                    "must be 1-65535".into(),
                ));
            }
        }
        let none = Resources::default();
        let r = self.proxy.resources.as_ref().unwrap_or(&none);
        for (kind, map) in [("requests", &r.requests), ("limits", &r.limits)] {
            for (res, q) in map {
                Quantity::parse(q).map_err(|reason| {
                    err(
                        format!("proxy.resources.{kind}.{res}"),
                        format!("{q:?}: {reason}"),
                    )
                })?;
            }
        }
        for res in ["cpu", "memory"] {
            if let (Some(req), Some(lim)) = (r.requests.get(res), r.limits.get(res)) {
                let (Ok(rq), Ok(lq)) = (Quantity::parse(req), Quantity::parse(lim)) else {
                    continue;
                };
                if rq.cmp_value(&lq).is_gt() {
                    return Err(err(
                        format!("proxy.resources.requests.{res}"),
                        format!("{req} is more than the limit {lim}"),
                    ));
                }
            }
        }
        self.istio()?;
        Ok(())
    }

    /// Valid but probably not meant: said once when the config is loaded.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if let Policy::Unrecognized(p) = &self.policy {
            w.push(format!(
                "policy {p:?} is not recognized (enabled|disabled): pods are injected only when \
                 they ask for it (sidecar.istio.io/inject: \"true\") or match alwaysInjectSelector"
            ));
        }
        w
    }

    /// Top-level keys of a config file that podwire does not read, with why, for a warning.
    pub fn unknown_keys<'a>(keys: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        keys.into_iter()
            .filter(|k| !KNOWN_KEYS.contains(k))
            .map(|k| {
                if ISTIO_TEMPLATE_KEYS.contains(&k) {
                    format!("config key {k:?} ignored: podwire adds only the proxy container (see `proxy`)")
                } else {
                    format!("config key {k:?} is unknown and ignored (known: {})", KNOWN_KEYS.join(", "))
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_profile() {
        let p = MeshProfile::istio();
        let cfg = InjectorConfig::default();
        assert_eq!(cfg.policy, Policy::Enabled);
        assert_eq!(cfg.proxy_name(&p), "istio-proxy");
        assert_eq!(cfg.proxy_ids(&p), (1337, 1337));
        assert_eq!(
            cfg.namespace_selector(&p).to_string(),
            "istio-injection=enabled"
        );
        assert_eq!(cfg.validate(&p), Ok(()));
    }

    #[test]
    fn reads_istio_keys_from_json() {
        let cfg: InjectorConfig = serde_json::from_value(serde_json::json!({
            "policy": "disabled",
            "neverInjectSelector": [{"matchExpressions": [{"key": "openshift.io/build.name", "operator": "Exists"}]}],
            "alwaysInjectSelector": [{"matchLabels": {"mesh": "yes"}}],
            "injectedAnnotations": {"example.com/team": "a"},
            "proxy": {"uid": 2000, "resources": {"requests": {"cpu": "10m"}}}
        }))
        .expect("config");
        let p = MeshProfile::istio();
        assert_eq!(cfg.policy, Policy::Disabled);
        assert_eq!(cfg.proxy_ids(&p), (2000, 2000));
        let r = cfg.proxy.resources.as_ref().expect("given");
        assert!(r.limits.is_empty());
        assert!(cfg.proxy.ports.is_empty(), "the template's ports are kept");
        assert_eq!(cfg.validate(&p), Ok(()));
        let odd: InjectorConfig =
            serde_json::from_value(serde_json::json!({"policy": "Enabled"})).expect("config");
        assert_eq!(odd.policy, Policy::Unrecognized("Enabled".into()));
    }

    #[test]
    fn refuses_bad_values_naming_the_field() {
        let p = MeshProfile::istio();
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (serde_json::json!({"proxy": {"uid": 0}}), "proxy.uid"),
            (
                serde_json::json!({"proxy": {"name": "Istio_Proxy"}}),
                "proxy.name",
            ),
            (
                serde_json::json!({"proxy": {"resources": {"limits": {"cpu": "2 cores"}}}}),
                "proxy.resources.limits.cpu",
            ),
            (
                serde_json::json!({"alwaysInjectSelector": [{"matchExpressions": [{"key": "a", "operator": "In"}]}]}),
                "alwaysInjectSelector[0].matchExpressions[0]",
            ),
            (
                serde_json::json!({"injectedAnnotations": {"sidecar.istio.io/status": "x"}}),
                "injectedAnnotations",
            ),
            (
                serde_json::json!({"proxy": {"name": "envoy"}}),
                "proxy.name",
            ),
            (
                serde_json::json!({"injectedAnnotations": {"sidecar.istio.io/inject": "false"}}),
                "injectedAnnotations",
            ),
            (
                serde_json::json!({"injectedAnnotations": {"sidecar.istio.io/interceptionMode": "NONE"}}),
                "injectedAnnotations",
            ),
        ];
        // Values that leave the plugin on are no reason to refuse a config.
        for ok in [
            serde_json::json!({"injectedAnnotations": {"sidecar.istio.io/inject": "true"}}),
            serde_json::json!({"injectedAnnotations": {"sidecar.istio.io/interceptionMode": "REDIRECT"}}),
        ] {
            let cfg: InjectorConfig = serde_json::from_value(ok.clone()).expect("shape");
            assert!(cfg.validate(&p).is_ok(), "{ok}");
        }
        for (v, field) in cases {
            let cfg: InjectorConfig = serde_json::from_value(v).expect("shape");
            match cfg.validate(&p) {
                Err(Error::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn reports_unknown_keys() {
        let w = InjectorConfig::unknown_keys(["policy", "template", "polcy"]);
        assert_eq!(w.len(), 2);
        assert!(w[0].contains("only the proxy container"));
        assert!(w[1].contains("\"polcy\" is unknown"));
    }
}
