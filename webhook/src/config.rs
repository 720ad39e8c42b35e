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
    /// Valid but probably not meant (unknown keys, a proxy name the plugin does not know):
    /// said once at start-up.
    pub warnings: Vec<String>,
}

pub fn load_config(path: &Path, profile: &MeshProfile) -> Result<LoadedConfig, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigRead {
        path: path.display().to_string(),
        source,
    })?;
    parse_config(&text, &path.display().to_string(), profile)
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
                warnings: InjectorConfig::default().warnings(profile),
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
    config
        .validate(profile)
        .map_err(|source| Error::ConfigInvalid {
            path: origin.to_string(),
            source,
        })?;
    let mut warnings = InjectorConfig::unknown_keys(keys.iter().map(String::as_str));
    warnings.extend(config.warnings(profile));
    Ok(LoadedConfig { config, warnings })
}

/// `data.config` of a ConfigMap, if the file is one.
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
        assert_eq!(c.config.proxy.args, ["proxy", "sidecar"]);
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
