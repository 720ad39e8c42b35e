//! Reading the injector config file (YAML) and `--namespace-labels`.
//!
//! The file is the injector config itself, or the Istio-style ConfigMap holding it under
//! `data.config` (what `kubectl get configmap istio-sidecar-injector -o yaml` prints).

use crate::Error;
use podwire_core::inject::{parse_labels, InjectorConfig, Labels};
use podwire_core::MeshProfile;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct LoadedConfig {
    pub config: InjectorConfig,
    /// Valid but probably not meant (unknown keys, an unrecognised policy):
    /// said once at start-up.
    pub warnings: Vec<String>,
}

pub fn load_config(path: &Path, profile: &MeshProfile) -> Result<LoadedConfig, Error> {
    parse_config(&read_text(path)?, &path.display().to_string(), profile)
}

/// A config file's text, or an error naming the file.
fn read_text(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::ConfigRead {
        path: path.display().to_string(),
        source,
    })
}

/// Parse and check a config file's text; `origin` names it in messages.
pub fn parse_config(
    text: &str,
    origin: &str,
    profile: &MeshProfile,
) -> Result<LoadedConfig, Error> {
    let parse_err = |source| Error::ConfigParse {
        path: origin.to_string(),
        source,
    };
    let shape = |reason: String| Error::ConfigShape {
        path: origin.to_string(),
        reason,
    };
    let top: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(parse_err)?;
    // Istio's own istio-sidecar-injector ConfigMap carries the values beside the config.
    let cm_values = match top.get("data").and_then(|d| d.get("values")) {
        Some(v) if top.get("kind").and_then(|k| k.as_str()) == Some("ConfigMap") => {
            let text = v
                .as_str()
                .ok_or_else(|| shape("data.values must hold Istio's values as a string".into()))?;
            let values: serde_json::Value = serde_yaml_ng::from_str(text).map_err(parse_err)?;
            Some(values)
        }
        _ => None,
    };
    let inner;
    let text = match configmap_payload(&top) {
        Some(Ok(config)) => {
            inner = config;
            inner.as_str()
        }
        Some(Err(reason)) => return Err(shape(reason)),
        None => text,
    };
    let top: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(parse_err)?;
    let keys: Vec<String> = match &top {
        // An empty file is the default config.
        serde_yaml_ng::Value::Null => {
            return Ok(LoadedConfig {
                warnings: InjectorConfig::default().warnings(),
                config: InjectorConfig::default(),
            })
        }
        serde_yaml_ng::Value::Mapping(m) => m
            .keys()
            .map(|k| {
                k.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("{k:?}"))
            })
            .collect(),
        _ => return Err(shape("expected a mapping of config keys at the top".into())),
    };
    // Parsed from the text (not the Value) so errors carry line and column.
    let config: InjectorConfig = serde_yaml_ng::from_str(text).map_err(parse_err)?;
    let config = with_istio_settings(config, cm_values, None, origin, profile)?;
    let mut warnings = InjectorConfig::unknown_keys(keys.iter().map(String::as_str));
    warnings.extend(config.warnings());
    Ok(LoadedConfig { config, warnings })
}

/// `data.config` of a ConfigMap, if the file is one. (Its `data.values`, Istio's values, is
/// read by [`parse_config`] too.)
fn configmap_payload(top: &serde_yaml_ng::Value) -> Option<Result<String, String>> {
    if top.get("kind").and_then(|k| k.as_str()) != Some("ConfigMap") {
        return None;
    }
    Some(
        top.get("data")
            .and_then(|d| d.get("config"))
            .and_then(|c| c.as_str())
            .map(str::to_string)
            .ok_or_else(|| {
                "a ConfigMap must hold the injector config as a string in data.config".into()
            }),
    )
}

/// Which of Istio's installed settings a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IstioSetting {
    /// Helm values: the `values` of the `istio-sidecar-injector` ConfigMap (JSON or YAML),
    /// as `istioctl kube-inject --valuesFile` takes them.
    Values,
    /// MeshConfig: the `mesh` of the `istio` ConfigMap, as `--meshConfigFile` takes it.
    Mesh,
}

impl IstioSetting {
    fn key(self) -> &'static str {
        match self {
            IstioSetting::Values => "values",
            IstioSetting::Mesh => "mesh",
        }
    }
}

/// Read one of Istio's settings from a file: the document itself, or a ConfigMap holding it
/// under `data.values` / `data.mesh` (what `kubectl get configmap -o yaml` prints). A missing,
/// unreadable or malformed file is an error naming it: never a silent default.
pub fn load_istio_setting(path: &Path, what: IstioSetting) -> Result<serde_json::Value, Error> {
    parse_istio_setting(&read_text(path)?, &path.display().to_string(), what)
}

/// [`load_istio_setting`] on text; `origin` names it in messages.
pub fn parse_istio_setting(
    text: &str,
    origin: &str,
    what: IstioSetting,
) -> Result<serde_json::Value, Error> {
    let parse_err = |source| Error::ConfigParse {
        path: origin.to_string(),
        source,
    };
    let shape = |reason: String| Error::ConfigShape {
        path: origin.to_string(),
        reason,
    };
    let top: serde_json::Value = serde_yaml_ng::from_str(text).map_err(parse_err)?;
    let doc = if top.get("kind").and_then(|k| k.as_str()) == Some("ConfigMap") {
        let key = what.key();
        let inner = top
            .get("data")
            .and_then(|d| d.get(key))
            .and_then(|v| v.as_str())
            .ok_or_else(|| {
                shape(format!(
                    "a ConfigMap must hold Istio's {key} as a string in data.{key}"
                ))
            })?;
        serde_yaml_ng::from_str(inner).map_err(parse_err)?
    } else {
        top
    };
    match doc {
        serde_json::Value::Object(_) => Ok(doc),
        _ => Err(shape(format!("Istio's {} must be a mapping", what.key()))),
    }
}

/// The injector config with Istio's installed settings underneath: `values` and `mesh` from
/// the cluster (or files), the config file's own `values` / `mesh` merged over them (the file
/// wins), then everything checked.
pub fn with_istio_settings(
    mut config: InjectorConfig,
    values: Option<serde_json::Value>,
    mesh: Option<serde_json::Value>,
    origin: &str,
    profile: &MeshProfile,
) -> Result<InjectorConfig, Error> {
    for (base, own) in [(values, &mut config.values), (mesh, &mut config.mesh)] {
        if let Some(mut base) = base {
            deep_merge(&mut base, own);
            *own = base;
        }
    }
    let invalid = |source| Error::ConfigInvalid {
        path: origin.to_string(),
        source,
    };
    config.validate(profile).map_err(invalid)?;
    config.prepared().map_err(invalid)
}

/// `over` onto `base`: mappings merge key by key, anything else replaces.
pub fn deep_merge(base: &mut serde_json::Value, over: &serde_json::Value) {
    match (base, over) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
            for (k, v) in o {
                deep_merge(b.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        }
        (_, serde_json::Value::Null) => {}
        (b, o) => *b = o.clone(),
    }
}

/// `k=v,k2=v2`: the labels of the pod's namespace, known offline.
pub fn parse_namespace_labels(s: &str) -> Result<Labels, Error> {
    parse_labels(s).map_err(Error::NamespaceLabels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use podwire_core::inject::Policy;

    #[test]
    fn reads_the_config_or_a_configmap_holding_it() {
        let p = MeshProfile::istio();
        let direct = "policy: disabled\nalwaysInjectSelector:\n- matchLabels: {mesh: \"on\"}\n";
        let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio-sidecar-injector}\ndata:\n  config: |\n    policy: disabled\n    alwaysInjectSelector:\n    - matchLabels: {mesh: \"on\"}\n    template: '{{ .Values }}'\n";
        let a = parse_config(direct, "a.yaml", &p).expect("direct");
        let b = parse_config(cm, "cm.yaml", &p).expect("configmap");
        assert_eq!(a.config, b.config);
        assert_eq!(a.config.policy, Policy::Disabled);
        assert!(a.warnings.is_empty());
        assert_eq!(b.warnings.len(), 1, "{:?}", b.warnings);
        assert!(b.warnings[0].contains("\"template\" ignored"));
    }

    #[test]
    fn the_example_config_is_valid_and_complete() {
        let p = MeshProfile::istio();
        let c = parse_config(
            include_str!("../injector-config.example.yaml"),
            "injector-config.example.yaml",
            &p,
        )
        .expect("example parses");
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert_eq!(c.config.ignored_namespaces, ["istio-system"]);
        assert!(c.config.proxy.args.is_empty(), "Istio's args are kept");
        assert_eq!(c.config.istio().expect("values").tag, "1.28.0");
        assert_eq!(c.config.proxy_ids(&p), (1337, 1337));
    }

    #[test]
    fn empty_file_is_the_default() {
        let p = MeshProfile::istio();
        let c = parse_config("", "e.yaml", &p).expect("empty");
        assert_eq!(c.config, InjectorConfig::default());
        let c = parse_config("# nothing\n", "e.yaml", &p).expect("comment");
        assert_eq!(c.config, InjectorConfig::default());
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let p = MeshProfile::istio();
        for (text, want) in [
            ("policy: [", "not valid YAML"),
            ("- a\n- b\n", "expected a mapping"),
            (
                "neverInjectSelector:\n- matchExpressions:\n  - {key: a, operator: Equals}\n",
                "unknown variant `Equals`",
            ),
            ("proxy:\n  uid: 0\n", "proxy.uid"),
            ("proxy:\n  uid: -5\n", "not valid YAML"),
            ("kind: ConfigMap\ndata: {}\n", "data.config"),
        ] {
            let e = parse_config(text, "inj.yaml", &p)
                .expect_err(text)
                .to_string();
            assert!(e.contains("inj.yaml") && e.contains(want), "{text:?}: {e}");
        }
    }
}
